//! A topic memory built offline (`tidings train memory`) and loaded at start-up
//! (`serve --topic-memory`): the embeddings of a corpus of unlabelled articles, against which
//! every zero-shot label set (the default taxonomy and request labels alike) is refined and
//! remembered ([`super::topics::refine`], [`super::topics::Memory`]).
//!
//! Unlike online refinement (`serve --refine-topics`), which learns from the traffic a
//! replica happens to see, a memory file is fixed: every replica that loads the same file,
//! and the same server after a restart, gives bit-identical topic scores for the same
//! request, and one caller's traffic changes nobody's scores.
//!
//! The file is a safetensors file: one tensor `vectors`, f16 `[articles, dim]` (unit-length
//! article embeddings; half precision keeps 20,000 MiniLM embeddings at 15 MB), and metadata:
//! the format, the corpus's name, the encoder's probe embedding (so a memory built with
//! another topic encoder is refused), and how it was built. Embeddings are stored, never
//! text.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The `format` metadata value of a memory file.
pub const FORMAT: &str = "tidings-topic-memory/1";

/// Fewest articles a memory may hold: a memory votes with its 10 nearest articles, and
/// refinement needs articles to spread over the labels.
pub const MIN_ARTICLES: usize = 32;

/// Why a memory file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The file could not be read.
    #[error("reading topic memory {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a safetensors file of the expected layout.
    #[error("topic memory {path} is not a {FORMAT} file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The memory was built with another topic encoder than the one loaded.
    #[error(
        "topic memory {path} was built with another topic encoder (probe cosine {cosine:.3}): \
         rebuild it with `tidings train memory` and this encoder"
    )]
    OtherEncoder {
        /// The file.
        path: String,
        /// Cosine between this encoder's probe embedding and the file's.
        cosine: f32,
    },
    /// Writing the file failed.
    #[error("writing topic memory {path}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// Too few articles.
    #[error("a topic memory needs at least {MIN_ARTICLES} articles; got {0}")]
    TooFew(usize),
    /// An article's embedding is empty, zero or not finite.
    #[error("article {0} has no usable embedding (empty, zero or not finite)")]
    Unusable(usize),
}

/// A loaded topic memory.
#[derive(Debug, Clone)]
pub struct TopicMemory {
    /// The corpus it was built from, as its builder named it.
    pub name: String,
    /// SHA-256 (hex) of its content, metadata and vectors: the same hash on two replicas
    /// means the same scores, and the same corpus built twice gives the same hash.
    pub sha256: String,
    /// Unit-length article embeddings, as stored (f16, widened).
    pub vectors: Arc<Vec<Vec<f32>>>,
}

/// Unit length, or `None` for a vector that is not finite or is zero.
fn unit(v: &[f32]) -> Option<Vec<f32>> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    (n.is_finite() && n > 0.0).then(|| v.iter().map(|x| x / n).collect())
}

/// Writes a memory of `articles` (embeddings from the topic encoder whose probe embedding
/// is `probe`) to `path`, atomically (a temporary file renamed into place). `name` names
/// the corpus; `built` says how (stored as metadata). Returns the file's SHA-256.
pub fn save(
    path: &Path,
    name: &str,
    built: &str,
    articles: &[Vec<f32>],
    probe: &[f32],
) -> Result<String, MemoryError> {
    let vectors: Vec<Vec<f32>> = articles
        .iter()
        .enumerate()
        .map(|(i, a)| unit(a).ok_or(MemoryError::Unusable(i)))
        .collect::<Result<_, _>>()?;
    if vectors.len() < MIN_ARTICLES {
        return Err(MemoryError::TooFew(vectors.len()));
    }
    let dim = vectors[0].len();
    let bytes: Vec<u8> = vectors
        .iter()
        .flatten()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F16,
        vec![vectors.len(), dim],
        &bytes,
    )
    .map_err(|source| MemoryError::Write {
        path: path.display().to_string(),
        source,
    })?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("name".to_string(), name.to_string()),
        ("built".to_string(), built.to_string()),
        (
            "encoder_probe".to_string(),
            serde_json::to_string(probe).unwrap_or_default(),
        ),
    ]);
    let hash = content_hash(&metadata, &bytes);
    safetensors::serialize_to_file([("vectors", view)], Some(metadata), path).map_err(
        |source| MemoryError::Write {
            path: path.display().to_string(),
            source,
        },
    )?;
    Ok(hash)
}

/// SHA-256 (hex) of a memory's content: its metadata, sorted by key, then its vectors'
/// bytes. The file's own bytes would not do: safetensors writes the metadata in hash-map
/// order, so the same corpus built twice gives other bytes but the same content hash.
fn content_hash(metadata: &HashMap<String, String>, vectors: &[u8]) -> String {
    use sha2::Digest;
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    let mut h = sha2::Sha256::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(metadata[k].as_bytes());
        h.update([0]);
    }
    h.update(vectors);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the memory at `path` for a topic encoder of width `dim` whose probe embedding is
/// `probe` (empty: not checked).
pub fn load(path: &Path, dim: usize, probe: &[f32]) -> Result<TopicMemory, MemoryError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| MemoryError::Read {
        path: shown.clone(),
        source,
    })?;
    let bad = |reason: String| MemoryError::Format {
        path: shown.clone(),
        reason,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("format {:?}", meta.get("format"))));
    }
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let tensor = file.tensor("vectors").map_err(|e| bad(e.to_string()))?;
    let shape = tensor.shape().to_vec();
    if tensor.dtype() != safetensors::Dtype::F16 || shape.len() != 2 || shape[1] != dim {
        return Err(bad(format!(
            "vectors are {:?} {shape:?}; this topic encoder needs f16 [n, {dim}]",
            tensor.dtype()
        )));
    }
    let vectors: Vec<Vec<f32>> = tensor
        .data()
        .chunks_exact(2 * dim)
        .map(|row| {
            row.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        })
        .collect();
    if let Some(i) = vectors
        .iter()
        .position(|v| v.iter().any(|x| !x.is_finite()))
    {
        return Err(MemoryError::Unusable(i));
    }
    if vectors.len() < MIN_ARTICLES {
        return Err(MemoryError::TooFew(vectors.len()));
    }
    let stored: Vec<f32> = meta
        .get("encoder_probe")
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_default();
    if !probe.is_empty() && stored.len() != probe.len() {
        return Err(bad(format!(
            "no encoder probe of width {} (it has {} values)",
            probe.len(),
            stored.len()
        )));
    }
    if !probe.is_empty() {
        let cosine: f32 = stored.iter().zip(probe).map(|(a, b)| a * b).sum();
        if cosine < 0.99 {
            return Err(MemoryError::OtherEncoder {
                path: shown,
                cosine,
            });
        }
    }
    Ok(TopicMemory {
        name: meta.get("name").cloned().unwrap_or_default(),
        sha256: content_hash(&meta, tensor.data()),
        vectors: Arc::new(vectors),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn articles(n: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                (0..dim)
                    .map(|j| ((i * 7 + j * 3) % 11) as f32 - 5.0)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_memory_round_trips_and_checks_its_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let probe = unit(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        let written = save(&path, "corpus", "test", &articles(40, 4), &probe).unwrap();
        let m = load(&path, 4, &probe).unwrap();
        assert_eq!(
            (m.name.as_str(), m.sha256.as_str()),
            ("corpus", written.as_str())
        );
        assert_eq!(m.vectors.len(), 40);
        for (v, a) in m.vectors.iter().zip(articles(40, 4)) {
            let a = unit(&a).unwrap();
            assert!(
                v.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-3),
                "{v:?} {a:?}"
            );
        }
        // The same file loads to the same bits.
        assert_eq!(load(&path, 4, &probe).unwrap().vectors, m.vectors);
        let other = unit(&[4.0, -3.0, 2.0, -1.0]).unwrap();
        assert!(matches!(
            load(&path, 4, &other),
            Err(MemoryError::OtherEncoder { .. })
        ));
        assert!(matches!(
            load(&path, 8, &[]),
            Err(MemoryError::Format { .. })
        ));
        assert!(matches!(
            save(&path, "c", "t", &articles(5, 4), &probe),
            Err(MemoryError::TooFew(5))
        ));
        let mut zero = articles(40, 4);
        zero[7] = vec![0.0; 4];
        assert!(matches!(
            save(&path, "c", "t", &zero, &probe),
            Err(MemoryError::Unusable(7))
        ));
        // Built again, the same content has the same hash.
        let again = save(&path, "corpus", "test", &articles(40, 4), &probe).unwrap();
        assert_eq!(again, written);
        std::fs::write(&path, b"not a memory").unwrap();
        assert!(matches!(
            load(&path, 4, &[]),
            Err(MemoryError::Format { .. })
        ));
    }
}
