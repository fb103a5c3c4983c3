//! Training and evaluation: CoNLL reading, the NER fine-tuning loop, topic heads, and the
//! strict entity scorer.
//!
//! - [`conll`] — CoNLL-2003 reader and IOB span reading.
//! - [`score`] — entity-level precision/recall/F1.
//! - [`ner`] — `tidings train ner` and the dev evaluation it shares with `tidings eval ner`.
//! - [`topics`] — `tidings train topics`: a linear head over frozen article embeddings.

pub mod conll;
pub mod ner;
pub mod score;
pub mod topics;
