//! # Tidings
//!
//! A gRPC service that reads news articles and says what they are about: their **topics**
//! (zero-shot against any labels, or a default news taxonomy) and their **named entities**
//! (people, organisations, places, ...), running small transformer encoders in-process with
//! candle.
//!
//! # Layout
//! The layers call only downwards:
//! - [`server`] — the process: config, both listeners, TLS, health, reflection, shutdown.
//! - [`api`] — the tonic service, protobuf <-> domain types, status mapping, auth.
//! - [`http`] — the HTTP/JSON API, its OpenAPI document and the page, on the same service.
//! - [`trace`] — a span per call, article and stage, request ids, OpenTelemetry export.
//! - [`engine`] — the bounded queue and the dynamic batcher thread that runs the models
//!   (through a model trait, so its scheduling is unit-tested alone).
//! - [`pipeline`] — text -> pieces -> windows -> rows; model outputs -> entities and topics;
//!   model assembly ([`pipeline::assembly`]) and topic memories ([`pipeline::topic_memory`]).
//! - [`model`] — HF-format model directories, the BERT-family encoder and its heads.
//! - [`train`] — CoNLL reading, NER fine-tuning, topic heads, calibration, scoring.
//! - [`proto`] — the code generated from `proto/tidings/v1/tidings.proto`.

pub mod api;
pub mod engine;
pub mod http;
pub mod model;
pub mod pipeline;
pub mod server;
pub mod trace;
pub mod train;

/// Code generated from `proto/tidings/v1/tidings.proto` (package `tidings.v1`).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("tidings.v1");
    include!(concat!(env!("OUT_DIR"), "/tidings.v1.serde.rs"));

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tidings_descriptor.bin"));
}
