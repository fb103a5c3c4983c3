//! Protobuf <-> domain types, with validation at the door: a request either becomes a valid
//! [`Article`] or an INVALID_ARGUMENT status naming the field and the limit, with a
//! `google.rpc.BadRequest` detail.

use crate::engine::{EngineError, Timing};
use crate::pipeline::analysis::{Analysis, Article, Options};
use crate::pipeline::topics::Label;
use crate::proto;
use std::collections::HashSet;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Request limits enforced by the API layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most Unicode scalar values in `text`.
    pub max_text_chars: usize,
    /// Most Unicode scalar values in `title`.
    pub max_title_chars: usize,
    /// Most request-time labels.
    pub max_labels: usize,
    /// Most examples per label.
    pub max_label_examples: usize,
    /// Most chars in one label text (name, description, example).
    pub max_label_chars: usize,
    /// Most items in one AnalyzeBatch.
    pub max_batch_items: usize,
    /// Most UTF-8 bytes in a request's `id` (it is echoed in answers and messages).
    pub max_id_bytes: usize,
    /// Most entries in `tasks`.
    pub max_tasks: usize,
    /// Most entries in `entity_types`.
    pub max_entity_types: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_text_chars: 200_000,
            max_title_chars: 2_000,
            max_labels: 64,
            max_label_examples: 16,
            max_label_chars: 2_000,
            max_batch_items: 64,
            max_id_bytes: 256,
            max_tasks: 8,
            max_entity_types: 32,
        }
    }
}

/// An INVALID_ARGUMENT status with a BadRequest field violation.
pub fn invalid(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// An entity model a request may choose with `ner_model`: its name and the entity types it
/// produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityModel {
    /// The name requests choose it by.
    pub name: String,
    /// Its entity types (e.g. PER, ORG).
    pub types: Vec<String>,
}

impl EntityModel {
    /// The loaded NER models, the default first (empty without one).
    pub fn all_of(models: &crate::pipeline::analysis::Models) -> Vec<Self> {
        models
            .ner_models()
            .map(|n| Self {
                name: n.name.clone(),
                types: n.tags.entity_types(),
            })
            .collect()
    }
}

/// Validates a request and turns it into an article and its labels (`None` = default
/// taxonomy). `ner_models` are the entity models loaded, the default first: `ner_model` must
/// name one of them, and `entity_types` be types of the one chosen.
pub fn article_from_proto(
    req: proto::AnalyzeRequest,
    limits: &Limits,
    ner_models: &[EntityModel],
) -> Result<(Article, Option<Vec<Label>>), Status> {
    check_sizes(&req, limits)?;
    let ner = ner_model_from_proto(&req, limits, ner_models)?;
    let types = ner.map_or(&[][..], |m| m.types.as_slice());
    let options = options_from_proto(&req, types)?;
    check_topic_head(&req, limits)?;
    let labels = labels_from_proto(req.labels, limits)?;
    Ok((
        Article {
            id: req.id,
            text: req.text,
            title: req.title,
            options,
        },
        labels,
    ))
}

/// The first check of a request: `id`, `tasks` and `entity_types` within their limits,
/// `text` not blank and `text` and `title` within theirs.
fn check_sizes(req: &proto::AnalyzeRequest, limits: &Limits) -> Result<(), Status> {
    if req.id.len() > limits.max_id_bytes {
        return Err(invalid(
            "id",
            format!(
                "has {} bytes, more than the limit of {} (max_id_bytes)",
                req.id.len(),
                limits.max_id_bytes
            ),
        ));
    }
    for (field, n, limit) in [
        ("tasks", req.tasks.len(), limits.max_tasks),
        (
            "entity_types",
            req.entity_types.len(),
            limits.max_entity_types,
        ),
    ] {
        if n > limit {
            return Err(invalid(
                field,
                format!("has {n} entries, more than the limit of {limit}"),
            ));
        }
    }
    if req.text.trim().is_empty() {
        return Err(invalid("text", "must not be empty or whitespace only"));
    }
    let chars = req.text.chars().count();
    if chars > limits.max_text_chars {
        return Err(invalid(
            "text",
            format!(
                "has {chars} characters, more than the limit of {} (max_text_chars)",
                limits.max_text_chars
            ),
        ));
    }
    let title_chars = req.title.chars().count();
    if title_chars > limits.max_title_chars {
        return Err(invalid(
            "title",
            format!(
                "has {title_chars} characters, more than the limit of {} (max_title_chars)",
                limits.max_title_chars
            ),
        ));
    }
    Ok(())
}

/// The request's analysis options, checked in turn: every task known, both minimum scores
/// in 0..=1, every entity type one the model knows (`entity_types`).
fn options_from_proto(
    req: &proto::AnalyzeRequest,
    entity_types: &[String],
) -> Result<Options, Status> {
    let mut options = Options {
        topics: req.tasks.is_empty(),
        entities: req.tasks.is_empty(),
        top_k: req.top_k as usize,
        min_entity_score: req.min_entity_score,
        entity_types: HashSet::new(),
        multi_label: req.multi_label,
        topic_head: (!req.topic_head.is_empty()).then(|| req.topic_head.clone()),
        ner_model: (!req.ner_model.is_empty()).then(|| req.ner_model.clone()),
        min_topic_score: req.min_topic_score,
    };
    for (i, &t) in req.tasks.iter().enumerate() {
        match proto::Task::try_from(t) {
            Ok(proto::Task::Topics) => options.topics = true,
            Ok(proto::Task::Entities) => options.entities = true,
            _ => {
                return Err(invalid(
                    &format!("tasks[{i}]"),
                    format!("unknown task {t}; use TASK_TOPICS (1) or TASK_ENTITIES (2)"),
                ))
            }
        }
    }
    if !(0.0..=1.0).contains(&req.min_topic_score) {
        return Err(invalid("min_topic_score", "must be between 0 and 1"));
    }
    if !(0.0..=1.0).contains(&req.min_entity_score) {
        return Err(invalid("min_entity_score", "must be between 0 and 1"));
    }
    for (i, t) in req.entity_types.iter().enumerate() {
        if !entity_types.iter().any(|k| k == t) {
            return Err(invalid(
                &format!("entity_types[{i}]"),
                format!(
                    "unknown entity type {t:?}; the model knows {}",
                    entity_types.join(", ")
                ),
            ));
        }
        options.entity_types.insert(t.clone());
    }
    Ok(options)
}

/// The entity model that tags the request: the one `ner_model` names (within
/// `max_id_bytes`, one of `models`, whatever the tasks), or the default (the first; `None`
/// when none is loaded).
fn ner_model_from_proto<'a>(
    req: &proto::AnalyzeRequest,
    limits: &Limits,
    models: &'a [EntityModel],
) -> Result<Option<&'a EntityModel>, Status> {
    let name = &req.ner_model;
    if name.is_empty() {
        return Ok(models.first());
    }
    if name.len() > limits.max_id_bytes {
        return Err(invalid(
            "ner_model",
            format!(
                "has {} bytes, more than the limit of {} (max_id_bytes)",
                name.len(),
                limits.max_id_bytes
            ),
        ));
    }
    match models.iter().find(|m| &m.name == name) {
        Some(m) => Ok(Some(m)),
        None => {
            let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            let e = crate::pipeline::analysis::UnknownNerModel {
                name: name.clone(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            };
            Err(invalid("ner_model", e.to_string()))
        }
    }
}

/// A `topic_head`, when set: not together with `labels`, and within `max_id_bytes`.
fn check_topic_head(req: &proto::AnalyzeRequest, limits: &Limits) -> Result<(), Status> {
    if !req.topic_head.is_empty() {
        if !req.labels.is_empty() {
            return Err(invalid(
                "topic_head",
                "give either labels or topic_head, not both",
            ));
        }
        if req.topic_head.len() > limits.max_id_bytes {
            return Err(invalid(
                "topic_head",
                format!(
                    "has {} bytes, more than the limit of {} (max_id_bytes)",
                    req.topic_head.len(),
                    limits.max_id_bytes
                ),
            ));
        }
    }
    Ok(())
}

fn labels_from_proto(
    labels: Vec<proto::TopicLabel>,
    limits: &Limits,
) -> Result<Option<Vec<Label>>, Status> {
    if labels.is_empty() {
        return Ok(None);
    }
    if labels.len() > limits.max_labels {
        return Err(invalid(
            "labels",
            format!(
                "has {} labels, more than the limit of {} (max_labels)",
                labels.len(),
                limits.max_labels
            ),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(labels.len());
    for (i, l) in labels.into_iter().enumerate() {
        let name = l.name.trim().to_string();
        if name.is_empty() {
            return Err(invalid(&format!("labels[{i}].name"), "must not be empty"));
        }
        if !seen.insert(name.to_lowercase()) {
            return Err(invalid(
                &format!("labels[{i}].name"),
                format!("duplicate label {name:?}"),
            ));
        }
        if l.examples.len() > limits.max_label_examples {
            return Err(invalid(
                &format!("labels[{i}].examples"),
                format!(
                    "has {} examples, more than the limit of {}",
                    l.examples.len(),
                    limits.max_label_examples
                ),
            ));
        }
        let too_long = std::iter::once(&name)
            .chain(std::iter::once(&l.description))
            .chain(l.examples.iter())
            .any(|t| t.chars().count() > limits.max_label_chars);
        if too_long {
            return Err(invalid(
                &format!("labels[{i}]"),
                format!(
                    "a label text is longer than {} characters",
                    limits.max_label_chars
                ),
            ));
        }
        if l.id.len() > limits.max_id_bytes || l.parent.len() > limits.max_id_bytes {
            return Err(invalid(
                &format!("labels[{i}].id"),
                format!(
                    "is longer than {} bytes (max_id_bytes)",
                    limits.max_id_bytes
                ),
            ));
        }
        out.push(Label {
            name,
            description: l.description,
            examples: l.examples,
            id: l.id,
            parent: l.parent,
        });
    }
    if let Err(e) = crate::pipeline::topics::parents(&out) {
        let field = e.split(':').next().unwrap_or("labels").to_string();
        let message = e.split_once(": ").map_or(e.as_str(), |x| x.1).to_string();
        return Err(invalid(&field, message));
    }
    Ok(Some(out))
}

/// The response for an analysis.
pub fn analysis_to_proto(
    a: Analysis,
    timing: Timing,
    total: std::time::Duration,
) -> proto::AnalyzeResponse {
    proto::AnalyzeResponse {
        id: a.id,
        topics: a
            .topics
            .into_iter()
            .map(|t| proto::Topic {
                label: t.label,
                score: t.score,
                id: t.id,
            })
            .collect(),
        entities: a
            .entities
            .into_iter()
            .map(|m| proto::Entity {
                text: m.text,
                label: m.label,
                score: m.score,
                start: m.start,
                end: m.end,
                byte_start: m.byte_start,
                byte_end: m.byte_end,
            })
            .collect(),
        entity_groups: a
            .entity_groups
            .into_iter()
            .map(|g| proto::EntityGroup {
                text: g.text,
                label: g.label,
                mentions: g.mentions,
                score: g.score,
            })
            .collect(),
        reading: Some(proto::Reading {
            tokens: a.reading.tokens,
            windows: a.reading.windows,
            truncated: a.reading.truncated,
        }),
        timing: Some(proto::Timing {
            total_us: total.as_micros() as u64,
            queue_us: timing.queue.as_micros() as u64,
            inference_us: timing.inference.as_micros() as u64,
        }),
    }
}

/// The gRPC status of an engine error.
pub fn status_of(e: EngineError) -> Status {
    let code = match &e {
        EngineError::QueueFull { .. } => Code::ResourceExhausted,
        EngineError::TooLarge { .. } => Code::InvalidArgument,
        EngineError::Stopped => Code::Unavailable,
        EngineError::Tokenize(_) => Code::InvalidArgument,
        EngineError::Model(_) => Code::Internal,
        EngineError::NoModel(_) => Code::FailedPrecondition,
        EngineError::UnknownHead { .. } => return invalid("topic_head", e.to_string()),
        EngineError::UnknownNerModel { .. } => return invalid("ner_model", e.to_string()),
        EngineError::LabelsTooLarge { .. } => return invalid("labels", e.to_string()),
    };
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> proto::AnalyzeRequest {
        proto::AnalyzeRequest {
            text: text.into(),
            ..Default::default()
        }
    }

    fn types() -> Vec<EntityModel> {
        vec![EntityModel {
            name: "ner".into(),
            types: vec!["LOC".into(), "PER".into()],
        }]
    }

    #[test]
    fn rejects_bad_fields_with_their_names() {
        let l = Limits::default();
        let e = article_from_proto(req("  \n"), &l, &types()).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("text:"));
        let long = "x".repeat(l.max_text_chars + 1);
        assert!(article_from_proto(req(&long), &l, &types())
            .unwrap_err()
            .message()
            .contains("max_text_chars"));
        let mut r = req("ok");
        r.tasks = vec![0];
        assert!(article_from_proto(r, &l, &types())
            .unwrap_err()
            .message()
            .starts_with("tasks[0]"));
        let mut r = req("ok");
        r.entity_types = vec!["PER".into(), "FOO".into()];
        assert!(article_from_proto(r, &l, &types())
            .unwrap_err()
            .message()
            .starts_with("entity_types[1]"));
        let mut r = req("ok");
        r.labels = vec![
            proto::TopicLabel {
                name: "Sports".into(),
                ..Default::default()
            },
            proto::TopicLabel {
                name: "sports".into(),
                ..Default::default()
            },
        ];
        assert!(article_from_proto(r, &l, &types())
            .unwrap_err()
            .message()
            .contains("duplicate"));
        let mut r = req("ok");
        r.labels = vec![proto::TopicLabel::default()];
        assert!(article_from_proto(r, &l, &types())
            .unwrap_err()
            .message()
            .starts_with("labels[0].name"));
        let mut r = req("ok");
        r.labels = (0..=l.max_labels)
            .map(|i| proto::TopicLabel {
                name: format!("l{i}"),
                ..Default::default()
            })
            .collect();
        assert!(article_from_proto(r, &l, &types())
            .unwrap_err()
            .message()
            .contains("max_labels"));
    }

    #[test]
    fn ner_model_names_a_loaded_model_and_its_types_apply() {
        let l = Limits::default();
        let models = vec![
            types().remove(0),
            EntityModel {
                name: "multi".into(),
                types: vec!["ORG".into()],
            },
        ];
        let with = |name: &str, entity_types: &[&str]| proto::AnalyzeRequest {
            ner_model: name.into(),
            entity_types: entity_types.iter().map(|t| t.to_string()).collect(),
            ..req("ok")
        };
        let (a, _) = article_from_proto(with("", &["PER"]), &l, &models).unwrap();
        assert_eq!(a.options.ner_model, None);
        let (a, _) = article_from_proto(with("multi", &["ORG"]), &l, &models).unwrap();
        assert_eq!(a.options.ner_model.as_deref(), Some("multi"));
        // The chosen model's types, not the default's.
        let e = article_from_proto(with("multi", &["PER"]), &l, &models).unwrap_err();
        assert!(e.message().starts_with("entity_types[0]"), "{e:?}");
        let e = article_from_proto(with("nope", &[]), &l, &models).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "ner_model: unknown entity model \"nope\"; loaded: ner, multi"
        );
        let details = e.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "ner_model"
        );
        let long = "n".repeat(l.max_id_bytes + 1);
        let e = article_from_proto(with(&long, &[]), &l, &models).unwrap_err();
        assert!(e.message().contains("max_id_bytes"), "{e:?}");
        let e = article_from_proto(with("multi", &[]), &l, &[]).unwrap_err();
        assert!(e.message().ends_with("loaded: none"), "{e:?}");
    }

    #[test]
    fn bad_request_detail_names_the_field() {
        let e = invalid("text", "must not be empty");
        let details = e.get_error_details();
        let br = details.bad_request().expect("bad request detail");
        assert_eq!(br.field_violations[0].field, "text");
    }

    #[test]
    fn tasks_select_what_runs() {
        let mut r = req("ok");
        r.tasks = vec![proto::Task::Entities as i32];
        let (a, labels) = article_from_proto(r, &Limits::default(), &types()).unwrap();
        assert!(a.options.entities && !a.options.topics);
        assert!(labels.is_none());
    }
}
