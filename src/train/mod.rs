//! Training and evaluation: CoNLL reading, the NER fine-tuning loop, topic heads, and the
//! strict entity scorer.
//!
//! - [`conll`] — CoNLL-2003 reader and IOB span reading.
//! - [`score`] — entity-level precision/recall/F1.
//! - [`adapter`] — `tidings train ner --adapter-rank`: low-rank adapters on a frozen base.
//! - [`ner`] — `tidings train ner` and the dev evaluation it shares with `tidings eval ner`.
//! - [`projection`] — `tidings train projection`: a multi-task model's pooled states mapped
//!   onto its base sentence encoder's.
//! - [`topics`] — `tidings train topics`: a linear head over frozen article embeddings, the
//!   classes of labelled rows, and the head kind the flags choose.
//! - [`embedding_cache`] — `tidings train topics --embeddings-cache`: article embeddings kept
//!   in files named after the rows and the encoder.
//! - [`few_shot`] — `tidings train topics --shots`: few-shot heads over random draws, and the
//!   zero-shot refinement scores `tidings eval topics --refine` reports.
//! - [`calibration`] — `tidings eval topics --fit-multi-label`: Platt scaling of cosines and
//!   its reliability (ECE, Brier, precision and recall).

pub mod adapter;
pub mod calibration;
pub mod conll;
pub mod embedding_cache;
pub mod few_shot;
pub mod ner;
pub mod projection;
pub mod score;
pub mod topics;
