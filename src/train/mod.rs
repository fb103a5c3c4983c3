//! Training and evaluation: CoNLL reading, the NER fine-tuning loop, topic heads, and the
//! strict entity scorer.
//!
//! - [`conll`] — CoNLL-2003 reader and IOB span reading.
//! - [`score`] — entity-level precision/recall/F1.
//! - [`ner`] — `tidings train ner` and the dev evaluation it shares with `tidings eval ner`.
//! - [`projection`] — `tidings train projection`: a multi-task model's pooled states mapped
//!   onto its base sentence encoder's.
//! - [`topics`] — `tidings train topics`: a linear head over frozen article embeddings.

pub mod conll;
pub mod ner;
pub mod projection;
pub mod score;
pub mod topics;
