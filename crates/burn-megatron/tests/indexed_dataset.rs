//! Megatron `.bin/.idx` files: `preprocess` writes the bytes Megatron-Core writes, the
//! reader reads them, every dtype round-trips exactly, and corrupt files are errors.
//!
//! Reference: `tests/fixtures/megatron-data/`, written by Megatron-Core 0.19.2's
//! `IndexedDatasetBuilder` from `docs.jsonl` with the GPT-2 BPE and EOD appended.

use std::path::{Path, PathBuf};

use burn_megatron::data::{
    DType, Element, IndexHeader, IndexedDataset, IndexedDatasetBuilder, PreprocessOptions,
    Tokenizer, dataset_paths, preprocess,
};
use proptest::prelude::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/megatron-data").join(name)
}

fn gpt2() -> Tokenizer {
    let tokenizers = repo().join("data/tokenizers");
    Tokenizer::gpt2_bpe(
        &tokenizers.join("gpt2-vocab.json"),
        &tokenizers.join("gpt2-merges.txt"),
    )
    .unwrap()
}

#[test]
fn preprocess_writes_megatron_bytes() {
    let out = tempfile::tempdir().unwrap();
    let prefix = out.path().join("shakespeare");
    for workers in [1, 3] {
        let options = PreprocessOptions {
            input: fixture("docs.jsonl"),
            json_keys: vec!["text".to_string()],
            output_prefix: prefix.display().to_string(),
            append_eod: true,
            workers,
            progress: false,
        };
        let summary = preprocess(&options, &gpt2()).unwrap();
        assert_eq!(summary.documents, 600);
        assert_eq!(
            summary.outputs,
            vec![format!("{}_text_document", prefix.display())]
        );
        let (idx, bin) = dataset_paths(&summary.outputs[0]);
        assert_eq!(summary.bytes as u64, std::fs::metadata(&bin).unwrap().len());
        assert!(
            std::fs::read(&bin).unwrap()
                == std::fs::read(fixture("shakespeare_text_document.bin")).unwrap(),
            ".bin differs from Megatron's (workers={workers})"
        );
        assert!(
            std::fs::read(&idx).unwrap()
                == std::fs::read(fixture("shakespeare_text_document.idx")).unwrap(),
            ".idx differs from Megatron's (workers={workers})"
        );
    }
}

#[test]
fn reader_reads_the_megatron_fixture() {
    let dataset = IndexedDataset::open(fixture("shakespeare_text_document")).unwrap();
    assert_eq!(dataset.dtype(), DType::U16);
    assert_eq!(dataset.len(), 600);
    assert_eq!(dataset.documents(), 600);
    let tokens: usize = dataset
        .sequence_lengths()
        .unwrap()
        .iter()
        .map(|&l| l as usize)
        .sum();
    assert_eq!(tokens * 2, dataset.data_bytes());
    // The first document is the first JSON line, tokenized, plus EOD.
    let first = dataset.tokens(0, 0, None).unwrap();
    assert_eq!(*first.last().unwrap(), 50256);
    let ids: Vec<u32> = first[..first.len() - 1].iter().map(|&t| t as u32).collect();
    assert_eq!(
        gpt2().decode(&ids).unwrap(),
        "First Citizen:\nBefore we proceed any further, hear me speak."
    );
    assert_eq!(dataset.document_sequences(599).unwrap(), 599..600);
    assert_eq!(dataset.tokens(0, 2, Some(3)).unwrap(), first[2..5].to_vec());
    assert!(dataset.tokens(0, first.len(), Some(1)).is_err());
    assert!(dataset.tokens(600, 0, None).is_err());
}

fn round_trip<T: Element + PartialEq + std::fmt::Debug>(sequences: &[Vec<T>]) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("round_trip");
    let mut builder = IndexedDatasetBuilder::create(&prefix, T::DTYPE).unwrap();
    for (i, sequence) in sequences.iter().enumerate() {
        builder.add_sequence(sequence).unwrap();
        if i % 2 == 1 {
            builder.end_document();
        }
    }
    builder.end_document();
    builder.finish().unwrap();
    let dataset = IndexedDataset::open(&prefix).unwrap();
    assert_eq!(dataset.dtype(), T::DTYPE);
    assert_eq!(dataset.len(), sequences.len());
    for (i, expected) in sequences.iter().enumerate() {
        assert_eq!(
            &dataset.sequence::<T>(i).unwrap(),
            expected,
            "{:?} sequence {i}",
            T::DTYPE
        );
    }
    assert_eq!(dataset.document_sequences(0).unwrap(), 0..2);
}

#[test]
fn every_dtype_round_trips_exactly() {
    round_trip::<u8>(&[vec![0, 1, 255], vec![], vec![7]]);
    round_trip::<i8>(&[vec![i8::MIN, -1, 0, i8::MAX], vec![3]]);
    round_trip::<i16>(&[vec![i16::MIN, 0, i16::MAX], vec![-2, 2]]);
    round_trip::<u16>(&[vec![0, 50256, u16::MAX], vec![1]]);
    round_trip::<i32>(&[vec![i32::MIN, 0, i32::MAX], vec![-5]]);
    round_trip::<i64>(&[vec![i64::MIN, (1 << 53) + 1, i64::MAX], vec![]]);
    round_trip::<f32>(&[
        vec![f32::MIN_POSITIVE, -0.0, 1.5e38, f32::INFINITY],
        vec![0.1],
    ]);
    round_trip::<f64>(&[
        vec![f64::MIN_POSITIVE, -0.0, 1e300, f64::NEG_INFINITY],
        vec![0.1],
    ]);
    for dtype in DType::ALL {
        assert_eq!(DType::from_code(dtype.code() as u64).unwrap(), dtype);
    }
    assert_eq!(DType::for_vocab_size(50257), DType::U16);
    assert_eq!(DType::for_vocab_size(128_256), DType::I32);
}

#[test]
fn merging_concatenates_sequences_and_documents() {
    let dir = tempfile::tempdir().unwrap();
    let part = |name: &str, docs: &[&[i64]]| {
        let prefix = dir.path().join(name);
        let mut builder = IndexedDatasetBuilder::create(&prefix, DType::U16).unwrap();
        for doc in docs {
            builder.add_tokens(doc).unwrap();
            builder.end_document();
        }
        builder.finish().unwrap();
        IndexedDataset::open(prefix).unwrap()
    };
    let a = part("a", &[&[1, 2], &[3]]);
    let b = part("b", &[&[4, 5, 6]]);
    let merged_prefix = dir.path().join("merged");
    let mut builder = IndexedDatasetBuilder::create(&merged_prefix, DType::U16).unwrap();
    builder.append(&a).unwrap();
    builder.append(&b).unwrap();
    builder.finish().unwrap();
    let merged = IndexedDataset::open(&merged_prefix).unwrap();
    assert_eq!(merged.documents(), 3);
    assert_eq!(merged.tokens(2, 0, None).unwrap(), vec![4, 5, 6]);
    assert_eq!(merged.document_sequences(2).unwrap(), 2..3);
    // Tokens that do not fit the dtype are refused, not wrapped.
    let mut builder = IndexedDatasetBuilder::create(dir.path().join("c"), DType::U16).unwrap();
    let error = builder.add_tokens(&[70_000]).unwrap_err().to_string();
    assert!(
        error.contains("token id 70000 does not fit dtype U16"),
        "{error}"
    );
}

/// Opens index bytes (with the fixture's `.bin`) and reads everything through the
/// checked accessors; the point is that nothing panics.
fn read_everything(index: &[u8]) -> Result<(), burn_megatron::Error> {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("fuzzed");
    let (idx, bin) = dataset_paths(&prefix);
    std::fs::write(&idx, index).unwrap();
    std::fs::copy(fixture("shakespeare_text_document.bin"), &bin).unwrap();
    let dataset = IndexedDataset::open(&prefix)?;
    for sequence in 0..dataset.len().min(2000) {
        let _ = dataset.tokens(sequence, 0, None);
        let _ = dataset.tokens(sequence, 1, Some(2));
    }
    for document in 0..dataset.documents().min(2000) {
        let _ = dataset.document_sequences(document);
    }
    let _ = dataset.sequence_lengths();
    let _ = dataset.sequence_modes();
    Ok(())
}

#[test]
fn truncated_indexes_are_errors_naming_the_file() {
    let index = std::fs::read(fixture("shakespeare_text_document.idx")).unwrap();
    for length in (0..index.len())
        .step_by(97)
        .chain([33, 34, index.len() - 1])
    {
        let error = read_everything(&index[..length]).unwrap_err().to_string();
        assert!(
            error.contains("fuzzed.idx") && error.contains("truncated"),
            "{length}: {error}"
        );
    }
    read_everything(&index).unwrap();
    assert!(
        IndexHeader::parse(b"TNTIDX\0\0")
            .unwrap_err()
            .to_string()
            .contains("legacy TNTIDX")
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = IndexHeader::parse(&bytes);
        let mut with_magic = b"MMIDIDX\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00".to_vec();
        with_magic.extend(&bytes);
        let _ = read_everything(&with_magic);
    }

    #[test]
    fn corrupted_fixture_indexes_never_panic(
        flips in proptest::collection::vec((0usize..12042, any::<u8>()), 1..8)
    ) {
        let mut index = std::fs::read(fixture("shakespeare_text_document.idx")).unwrap();
        for (at, value) in flips {
            let len = index.len();
            index[at % len] = value;
        }
        let _ = read_everything(&index);
    }
}

/// A legacy TNTIDX dataset written byte by byte from the documented layout: items
/// `[10, 11, 12]` and `[13, 14]` of dtype i32 (code 4), one document.
fn legacy_fixture(dir: &Path) -> (PathBuf, Vec<u8>) {
    let words: Vec<u64> = vec![
        1, 4, 4, 2, 2, 2, // version, dtype, element size, items, size entries, documents
        0, 1, 2, // dim offsets
        0, 3, 5, // data offsets (elements)
        3, 2, // sizes
        0, 2, // document index
    ];
    let mut index = b"TNTIDX\x00\x00".to_vec();
    for word in words {
        index.extend_from_slice(&word.to_le_bytes());
    }
    let data: Vec<u8> = (10i32..15).flat_map(|v| v.to_le_bytes()).collect();
    let prefix = dir.join("legacy");
    let (idx, bin) = dataset_paths(&prefix);
    std::fs::write(&idx, &index).unwrap();
    std::fs::write(bin, data).unwrap();
    (prefix, index)
}

#[test]
fn legacy_tntidx_reads_lazily_and_cached() {
    use burn_megatron::data::{LegacyIndexedDataset, LegacyMode};
    let dir = tempfile::tempdir().unwrap();
    let (prefix, index) = legacy_fixture(dir.path());
    for mode in [LegacyMode::Lazy, LegacyMode::Cached] {
        let dataset = LegacyIndexedDataset::open(&prefix, mode).unwrap();
        assert_eq!(dataset.len(), 2);
        assert_eq!(dataset.dtype(), DType::I32);
        assert_eq!(dataset.tokens(0).unwrap(), vec![10, 11, 12], "{mode:?}");
        assert_eq!(dataset.tokens(1).unwrap(), vec![13, 14], "{mode:?}");
        assert_eq!(dataset.item_shape(0).unwrap(), &[3]);
        assert_eq!(dataset.document_index(), &[0, 2]);
        assert!(dataset.tokens(2).is_err());
    }
    // A truncated index and a truncated .bin are errors, not panics.
    let (idx, bin) = dataset_paths(&prefix);
    for length in [0, 20, 56, index.len() - 8] {
        std::fs::write(&idx, &index[..length]).unwrap();
        let error = LegacyIndexedDataset::open(&prefix, LegacyMode::Lazy).unwrap_err();
        assert!(error.to_string().contains("legacy.idx"), "{error}");
    }
    std::fs::write(&idx, &index).unwrap();
    std::fs::write(&bin, [0u8; 13]).unwrap();
    for mode in [LegacyMode::Lazy, LegacyMode::Cached] {
        let dataset = LegacyIndexedDataset::open(&prefix, mode).unwrap();
        assert!(dataset.tokens(0).is_ok());
        assert!(
            dataset
                .tokens(1)
                .unwrap_err()
                .to_string()
                .contains("truncated data")
        );
    }
    // The MMIDIDX reader points at the legacy reader.
    let error = IndexedDataset::open(&prefix).unwrap_err().to_string();
    assert!(error.contains("legacy TNTIDX"), "{error}");
}
