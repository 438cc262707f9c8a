//! The rank environment of a process, as torchrun, SLURM and OpenMPI set it.

use std::time::Duration;

use crate::parallel::{Layout, ParallelContext, TcpWorld};
use crate::{Error, Result};

/// Where this process sits in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank among the processes of this node (its GPU index).
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on.
    pub master_port: u16,
}

impl LaunchEnv {
    /// The environment of this process: torchrun's variables (`RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), else SLURM's
    /// (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`), else
    /// OpenMPI's (`OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
    /// `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE`), with `MASTER_ADDR`
    /// (default `127.0.0.1`) and `MASTER_PORT` (default 29500). `None` outside a launch.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming the variable when one is set but not a number, or the rank
    /// is not below the world size.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `lookup`.
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let number = |name: &str| -> Result<Option<usize>> {
            lookup(name)
                .map(|value| {
                    value.trim().parse::<usize>().map_err(|_| {
                        Error::InvalidConfig(format!(
                            "environment variable {name}={value} is not a number"
                        ))
                    })
                })
                .transpose()
        };
        let schemes = [
            ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
            [
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS_PER_NODE",
            ],
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ],
        ];
        for [rank, size, local_rank, local_size] in schemes {
            let (Some(rank_value), Some(world_size)) = (number(rank)?, number(size)?) else {
                continue;
            };
            if rank_value >= world_size {
                return Err(Error::InvalidConfig(format!(
                    "{rank}={rank_value} is not below {size}={world_size}"
                )));
            }
            let master_port = number("MASTER_PORT")?.unwrap_or(29500);
            let master_port = u16::try_from(master_port).map_err(|_| {
                Error::InvalidConfig(format!("MASTER_PORT={master_port} is not a port number"))
            })?;
            return Ok(Some(Self {
                rank: rank_value,
                world_size,
                local_rank: number(local_rank)?.unwrap_or(0),
                local_world_size: number(local_size)?.unwrap_or(1),
                master_addr: lookup("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string()),
                master_port,
            }));
        }
        Ok(None)
    }

    /// Connects this process to the job over TCP and builds its context for `layout`.
    ///
    /// # Errors
    ///
    /// When the layout does not use exactly the job's processes, or rank 0 cannot be
    /// reached within `timeout`.
    pub fn connect(
        &self,
        layout: Layout,
        timeout: Duration,
    ) -> Result<(ParallelContext, std::sync::Arc<TcpWorld>)> {
        layout.check_world_size(self.world_size)?;
        let address = format!("{}:{}", self.master_addr, self.master_port);
        let world = TcpWorld::connect(self.rank, self.world_size, &address, timeout)?;
        let context = ParallelContext::new(layout, self.rank, |name, members| {
            world.group(name, members)
        });
        Ok((context, world))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn torchrun_slurm_and_openmpi_environments() {
        assert_eq!(env(&[]).unwrap(), None);
        let torchrun = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (torchrun.rank, torchrun.world_size, torchrun.local_rank),
            (3, 8, 1)
        );
        assert_eq!(
            (torchrun.master_addr.as_str(), torchrun.master_port),
            ("node0", 1234)
        );
        let slurm = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                slurm.rank,
                slurm.world_size,
                slurm.local_rank,
                slurm.master_port
            ),
            (5, 16, 1, 29500)
        );
        let mpi = env(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")])
            .unwrap()
            .unwrap();
        assert_eq!(mpi.world_size, 2);
        let error = env(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("RANK=x is not a number"), "{error}");
        let error = env(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("RANK=2 is not below WORLD_SIZE=2"),
            "{error}"
        );
    }
}
