//! `launch`: starts the local ranks of a job with torchrun's environment, prefixes their
//! output with the rank, and stops them all when one fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Error, Result};

/// Where this node's processes sit in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Processes to start on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on.
    pub master_port: u16,
}

/// Runs `command` once per local rank and waits for all of them.
///
/// Each process gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `NODE_RANK`,
/// `MASTER_ADDR` and `MASTER_PORT`; its output lines are printed prefixed with
/// `[rank N]`. When one exits unsuccessfully, the others are killed.
///
/// # Errors
///
/// `InvalidConfig` for an empty command or sizes of zero; `Io` when a process cannot be
/// started; `RankFailed` naming the first rank that failed and its exit status.
pub fn launch(config: &LaunchConfig, command: &[String]) -> Result<()> {
    let (program, arguments) = command
        .split_first()
        .ok_or_else(|| Error::InvalidConfig("give the command to run after `--`".to_string()))?;
    if config.nproc_per_node == 0 || config.nnodes == 0 || config.node_rank >= config.nnodes {
        return Err(Error::InvalidConfig(format!(
            "--nproc-per-node {} --nnodes {} --node-rank {}: sizes must be positive and the node \
             rank below the node count",
            config.nproc_per_node, config.nnodes, config.node_rank
        )));
    }
    let world_size = config.nproc_per_node * config.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut printers = Vec::new();
    for local_rank in 0..config.nproc_per_node {
        let rank = config.node_rank * config.nproc_per_node + local_rank;
        let mut command = Command::new(program);
        // Each rank leads its own process group, so that stopping it stops what it started.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .args(arguments)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", config.nproc_per_node.to_string())
            .env("NODE_RANK", config.node_rank.to_string())
            .env("MASTER_ADDR", &config.master_addr)
            .env("MASTER_PORT", config.master_port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                kill_all(&mut children);
                Error::io(program, e)
            })?;
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped")),
            Box::new(child.stderr.take().expect("piped")),
        ];
        for (index, stream) in streams.into_iter().enumerate() {
            printers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream)
                    .lines()
                    .map_while(std::io::Result::ok)
                {
                    if index == 0 {
                        println!("[rank {rank}] {line}");
                    } else {
                        eprintln!("[rank {rank}] {line}");
                    }
                }
            }));
        }
        children.push((rank, child));
    }
    let outcome = supervise(&mut children);
    for printer in printers {
        let _ = printer.join();
    }
    outcome
}

/// Polls the processes until all succeed or one fails (then kills the rest).
fn supervise(children: &mut [(usize, Child)]) -> Result<()> {
    let mut running: Vec<usize> = (0..children.len()).collect();
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for index in running {
            let (rank, child) = &mut children[index];
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    let rank = *rank;
                    kill_all(children);
                    return Err(Error::RankFailed {
                        rank,
                        message: format!("exited with {status}; the other ranks were stopped"),
                    });
                }
                Ok(None) => still.push(index),
                Err(error) => {
                    let rank = *rank;
                    kill_all(children);
                    return Err(Error::RankFailed {
                        rank,
                        message: format!("could not be watched: {error}"),
                    });
                }
            }
        }
        running = still;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn kill_all(children: &mut [(usize, Child)]) {
    for (_, child) in children.iter_mut() {
        #[cfg(unix)]
        if let Ok(group) = i32::try_from(child.id()) {
            // Safety: a plain syscall on the process group this launcher created.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
