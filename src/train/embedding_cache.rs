//! The embeddings cache of `tidings train topics --embeddings-cache`: the article embeddings
//! of a data file kept in a JSON file named after the rows and the encoder that computed
//! them, so that topic-head recipes can be iterated on without re-embedding.
//!
//! A cache file `PATH.<key>.json` holds `{"key", "embeddings"}`. The key is an FNV-1a hash
//! of the encoder's description ([`model_key`]) and of every title and text, in order,
//! followed by the row count ([`rows_key`]); a file is reused only when its key matches and
//! it holds one vector of the encoder's dimension per row.

use super::topics::Example;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// What a cache file holds, as read back.
#[derive(serde::Deserialize)]
struct Cached {
    key: String,
    embeddings: Vec<Vec<f32>>,
}

/// What a cache file holds, as written (borrowing the embeddings).
#[derive(serde::Serialize)]
struct CachedRef<'a> {
    key: &'a str,
    embeddings: &'a [Vec<f32>],
}

/// FNV-1a over strings, each followed by a 0xff separator: a cache key of rows.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Hashes `bytes` in.
    fn add_bytes(&mut self, bytes: impl IntoIterator<Item = u8>) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Hashes `s` in, then the 0xff separator (a byte no UTF-8 string holds).
    fn add(&mut self, s: &str) {
        self.add_bytes(s.bytes().chain([0xff]));
    }
}

/// The description of an encoder that a cache key includes: the topic model's directory, the
/// arithmetic it runs in (with the device when not the CPU), the window and its overlap, and
/// the longest text an article keeps.
pub fn model_key(
    topic_dir: &str,
    precision: &str,
    window: usize,
    overlap: usize,
    max_text_chars: usize,
) -> String {
    format!("{topic_dir}|{precision}|{window}|{overlap}|{max_text_chars}")
}

/// The key of `examples` embedded by the encoder `model` ([`model_key`]): a hash of `model`
/// and of every title and text, in order, and the number of rows.
pub fn rows_key(model: &str, examples: &[Example]) -> String {
    let mut h = Fnv1a::default();
    h.add(model);
    for e in examples {
        h.add(&e.title);
        h.add(&e.text);
    }
    format!("{:016x}-{}", h.0, examples.len())
}

/// The file that the cache path `cache` names for rows with key `key`: `cache` with
/// `.<key>.json` appended to its file name.
pub fn cache_file(cache: &Path, key: &str) -> PathBuf {
    let mut name = cache.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{key}.json"));
    cache.with_file_name(name)
}

/// The embeddings kept in `file`, when it can be read, was written under `key`, and holds
/// `rows` vectors of `dim` dimensions each (`None` for `dim` accepts no vector).
pub fn read(file: &Path, key: &str, rows: usize, dim: Option<usize>) -> Option<Vec<Vec<f32>>> {
    let raw = std::fs::read(file).ok()?;
    let hit = serde_json::from_slice::<Cached>(&raw).ok()?;
    (hit.key == key
        && hit.embeddings.len() == rows
        && hit.embeddings.iter().all(|v| Some(v.len()) == dim))
    .then_some(hit.embeddings)
}

/// Keeps `embeddings` in `file` under `key`, creating the file's folder first.
pub fn write(file: &Path, key: &str, embeddings: &[Vec<f32>]) -> std::io::Result<()> {
    let out = CachedRef { key, embeddings };
    file.parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(file, serde_json::to_vec(&out).unwrap_or_default()))
}

/// Embeddings of `examples` by `embed` (given the rows' `(title, text)`; the caller computes
/// them as serving does), through files named after `cache` when given: reused when the file
/// was written for the same rows under the same encoder description `model` and has one
/// vector of `dim` dimensions per row, else computed and written there (a failed write only
/// warns). Says on stderr which it did.
pub fn embed_cached(
    examples: &[Example],
    model: &str,
    cache: Option<&Path>,
    dim: Option<usize>,
    embed: impl FnOnce(&[(String, String)]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let key = rows_key(model, examples);
    let file = cache.map(|c| cache_file(c, &key));
    if let Some(f) = &file {
        if let Some(hit) = read(f, &key, examples.len(), dim) {
            eprintln!("{} embeddings from {}", examples.len(), f.display());
            return Ok(hit);
        }
    }
    eprintln!("embedding {} articles...", examples.len());
    let articles: Vec<(String, String)> = examples
        .iter()
        .map(|e| (e.title.clone(), e.text.clone()))
        .collect();
    let embeddings = embed(&articles)?;
    if let Some(f) = &file {
        if let Err(e) = write(f, &key, &embeddings) {
            eprintln!(
                "warning: could not keep the embeddings in {}: {e}",
                f.display()
            );
        }
    }
    Ok(embeddings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(title: &str, text: &str) -> Example {
        Example {
            label: "1".into(),
            title: title.into(),
            text: text.into(),
        }
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // Test vectors of the FNV reference implementation (64-bit FNV-1a).
        for (input, want) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            let mut h = Fnv1a::default();
            h.add_bytes(input.bytes());
            assert_eq!(h.0, want, "{input:?}");
        }
    }

    #[test]
    fn rows_key_tells_rows_and_models_apart() {
        let rows = [example("t", "body one"), example("", "body two")];
        let key = rows_key("m", &rows);
        assert_eq!(key, rows_key("m", &rows), "deterministic");
        assert!(key.ends_with("-2"), "{key}");
        assert_eq!(key.len(), 16 + 2);
        assert_ne!(key, rows_key("n", &rows), "another encoder");
        assert_ne!(
            key,
            rows_key("m", &[rows[1].clone(), rows[0].clone()]),
            "order"
        );
        // The separator keeps a title's end from passing for the text's start.
        assert_ne!(
            rows_key("m", &[example("ab", "c")]),
            rows_key("m", &[example("a", "bc")])
        );
        // Labels are not part of the key: the embeddings do not depend on them.
        let mut relabelled = rows.clone();
        relabelled[0].label = "2".into();
        assert_eq!(key, rows_key("m", &relabelled));
    }

    #[test]
    fn model_key_and_cache_file_names() {
        assert_eq!(
            model_key("models/minilm", "int8", 254, 32, 100_000),
            "models/minilm|int8|254|32|100000"
        );
        assert_eq!(
            cache_file(Path::new("cache/ag"), "00ff-3"),
            PathBuf::from("cache/ag.00ff-3.json")
        );
    }

    #[test]
    fn a_written_file_is_read_back_only_for_the_same_rows_and_dimension() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("x.k-2.json");
        let v = vec![vec![1.0f32, 2.0], vec![3.0, 4.5]];
        write(&file, "k-2", &v).unwrap();
        assert_eq!(read(&file, "k-2", 2, Some(2)), Some(v));
        assert_eq!(read(&file, "other-2", 2, Some(2)), None, "another key");
        assert_eq!(read(&file, "k-2", 3, Some(2)), None, "another row count");
        assert_eq!(read(&file, "k-2", 2, Some(3)), None, "another dimension");
        assert_eq!(read(&file, "k-2", 2, None), None, "no encoder");
        assert_eq!(read(&dir.path().join("missing"), "k-2", 2, Some(2)), None);
        std::fs::write(&file, b"not json").unwrap();
        assert_eq!(read(&file, "k-2", 2, Some(2)), None, "unreadable");
    }

    #[test]
    fn embed_cached_embeds_once_then_reuses_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("emb");
        let rows = [example("a", "one"), example("b", "two")];
        let embed = |articles: &[(String, String)]| -> Result<Vec<Vec<f32>>> {
            Ok(articles
                .iter()
                .map(|(t, d)| vec![t.len() as f32, d.len() as f32])
                .collect())
        };
        let first = embed_cached(&rows, "m", Some(&cache), Some(2), embed).unwrap();
        assert_eq!(first, vec![vec![1.0, 3.0], vec![1.0, 3.0]]);
        let file = cache_file(&cache, &rows_key("m", &rows));
        assert!(file.exists(), "{}", file.display());
        let again = embed_cached(&rows, "m", Some(&cache), Some(2), |_| -> Result<_> {
            panic!("the cache should have answered")
        })
        .unwrap();
        assert_eq!(again, first);
        // Another encoder misses the cache.
        let other = embed_cached(&rows, "m2", Some(&cache), Some(2), |a| {
            Ok(vec![vec![0.0, 0.0]; a.len()])
        })
        .unwrap();
        assert_eq!(other, vec![vec![0.0, 0.0]; 2]);
    }

    #[test]
    fn without_a_cache_or_with_an_unwritable_one_the_rows_are_embedded() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let rows = [example("", "text")];
        let one =
            |a: &[(String, String)]| -> Result<Vec<Vec<f32>>> { Ok(vec![vec![7.0]; a.len()]) };
        assert_eq!(
            embed_cached(&rows, "m", None, Some(1), one).unwrap(),
            [[7.0]]
        );
        // A cache under a plain file cannot be written: a warning, and the embeddings.
        let under_file = blocker.join("cache");
        assert_eq!(
            embed_cached(&rows, "m", Some(&under_file), Some(1), one).unwrap(),
            [[7.0]]
        );
    }
}
