//! The OpenAPI 3.1 document of the HTTP API, generated when the server starts: paths from
//! the route table, schemas and descriptions from the proto's descriptor (with its
//! comments), in the proto3 JSON mapping. Neither can drift from what is served.

use super::routes::{Route, ROUTES};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet,
};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The proto package the schemas come from.
const PACKAGE: &str = "tidings.v1";

/// Leading comments of a proto file, by source path (message 4/i, field 4/i/2/j, ...).
fn comments(file: &FileDescriptorProto) -> HashMap<Vec<i32>, String> {
    let mut out = HashMap::new();
    if let Some(info) = &file.source_code_info {
        for loc in &info.location {
            if let Some(c) = &loc.leading_comments {
                let text = c
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
                    .trim()
                    .to_string();
                if !text.is_empty() {
                    out.insert(loc.path.clone(), text);
                }
            }
        }
    }
    out
}

/// A schema reference to the proto type `.tidings.v1.Name`.
fn reference(type_name: &str) -> Value {
    let name = type_name.rsplit('.').next().unwrap_or(type_name);
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The JSON schema of one field's value, per the proto3 JSON mapping.
fn field_schema(f: &FieldDescriptorProto) -> Value {
    let scalar = match f.r#type() {
        Type::String => json!({"type": "string"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Type::Uint32 | Type::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        // 64-bit integers are strings in the proto3 JSON mapping (numbers are accepted too).
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
            json!({"type": ["string", "integer"], "format": "int64"})
        }
        Type::Uint64 | Type::Fixed64 => {
            json!({"type": ["string", "integer"], "format": "uint64"})
        }
        Type::Float => json!({"type": "number", "format": "float"}),
        Type::Double => json!({"type": "number", "format": "double"}),
        Type::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Type::Enum | Type::Message | Type::Group => reference(f.type_name()),
    };
    if f.label() == Label::Repeated {
        json!({"type": "array", "items": scalar})
    } else {
        scalar
    }
}

/// The schema of one message.
fn message_schema(m: &DescriptorProto, path: &[i32], docs: &HashMap<Vec<i32>, String>) -> Value {
    let mut props = Map::new();
    for (j, f) in m.field.iter().enumerate() {
        let mut schema = field_schema(f);
        let mut fpath = path.to_vec();
        fpath.extend([2, j as i32]);
        let mut doc = docs.get(&fpath).cloned().unwrap_or_default();
        if let Some(o) = f.oneof_index.and_then(|i| m.oneof_decl.get(i as usize)) {
            if !f.proto3_optional() {
                let members: Vec<&str> = m
                    .field
                    .iter()
                    .filter(|g| g.oneof_index == f.oneof_index)
                    .map(|g| g.json_name())
                    .collect();
                doc = format!(
                    "{doc} (One of {}: at most one is set, oneof `{}`.)",
                    members.join(", "),
                    o.name()
                )
                .trim()
                .to_string();
            }
        }
        if let (Some(obj), false) = (schema.as_object_mut(), doc.is_empty()) {
            if obj.contains_key("$ref") {
                // A sibling of $ref is allowed in 3.1, but some tools drop it: wrap instead.
                schema = json!({"allOf": [schema], "description": doc});
            } else {
                obj.insert("description".into(), json!(doc));
            }
        }
        props.insert(f.json_name().to_string(), schema);
    }
    let mut schema = json!({
        "type": "object",
        "properties": props,
        // Unknown fields are refused with 400.
        "additionalProperties": false,
    });
    if let Some(d) = docs.get(path) {
        schema["description"] = json!(d);
    }
    schema
}

/// The error body every failure carries.
fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "A failed call: google.rpc.Status in the proto3 JSON mapping, plus the \
                        code's name. The HTTP status follows the gRPC code as Google's API \
                        design guide maps it (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, \
                        RESOURCE_EXHAUSTED 429 with Retry-After, DEADLINE_EXCEEDED 504, \
                        UNAVAILABLE 503, ...); 413 for a body over the size limit, 415 for a \
                        wrong Content-Type.",
        "required": ["code", "status", "message", "details"],
        "properties": {
            "code": {"type": "integer", "description": "The gRPC status code (google.rpc.Code)."},
            "status": {"type": "string", "description": "The code's name, e.g. INVALID_ARGUMENT."},
            "message": {"type": "string", "description": "What went wrong, naming the field and limit at fault."},
            "details": {
                "type": "array",
                "description": "google.rpc error details, e.g. type.googleapis.com/google.rpc.BadRequest with its fieldViolations.",
                "items": {"type": "object", "properties": {"@type": {"type": "string"}}}
            }
        }
    })
}

/// The OpenAPI 3.1 document, from an encoded `FileDescriptorSet` holding `tidings.v1`.
pub fn document(descriptor_set: &[u8]) -> Value {
    let set = FileDescriptorSet::decode(descriptor_set).unwrap_or_default();
    let (mut schemas, rpc_docs) = proto_schemas(&set);
    schemas.insert("Error".into(), error_schema());
    schemas.insert("StreamEnd".into(), stream_end_schema());
    let mut paths = Map::new();
    for r in ROUTES {
        paths
            .entry(r.path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a path item is an object")
            .insert(r.method.to_ascii_lowercase(), operation(r, &rpc_docs));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Tidings HTTP/JSON API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Topics and named entities of news articles. The same service as \
                            the gRPC API `tidings.v1.Tidings`, with the same limits, deadlines \
                            and errors; bodies are its messages in the canonical proto3 JSON \
                            mapping (lowerCamelCase names, enums as names, 64-bit integers as \
                            strings; every field is written, unknown fields are refused).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}
        },
        "paths": paths,
        "components": components(schemas),
    })
}

/// The schemas of the messages and enums of `tidings.v1` in `set`, by name, and the
/// documentation of its RPCs, by method name.
fn proto_schemas(set: &FileDescriptorSet) -> (Map<String, Value>, HashMap<String, String>) {
    let mut schemas = Map::new();
    let mut rpc_docs = HashMap::new();
    for file in set.file.iter().filter(|f| f.package() == PACKAGE) {
        let docs = comments(file);
        for (i, m) in file.message_type.iter().enumerate() {
            schemas.insert(
                m.name().to_string(),
                message_schema(m, &[4, i as i32], &docs),
            );
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            schemas.insert(e.name().to_string(), enum_schema(e, i, &docs));
        }
        for (s, svc) in file.service.iter().enumerate() {
            for (j, m) in svc.method.iter().enumerate() {
                if let Some(d) = docs.get(&vec![6, s as i32, 2, j as i32]) {
                    rpc_docs.insert(m.name().to_string(), d.clone());
                }
            }
        }
    }
    (schemas, rpc_docs)
}

/// The schema of the file's `i`th enum: its value names, described by the enum's comment
/// and each value's.
fn enum_schema(e: &EnumDescriptorProto, i: usize, docs: &HashMap<Vec<i32>, String>) -> Value {
    let names: Vec<&str> = e.value.iter().map(|v| v.name()).collect();
    let mut desc = docs.get(&vec![5, i as i32]).cloned().unwrap_or_default();
    for (j, v) in e.value.iter().enumerate() {
        if let Some(d) = docs.get(&vec![5, i as i32, 2, j as i32]) {
            desc.push_str(&format!(" `{}`: {d}", v.name()));
        }
    }
    json!({"type": "string", "enum": names, "description": desc.trim()})
}

/// The last line of every NDJSON answer.
fn stream_end_schema() -> Value {
    json!({
        "type": "object",
        "description": "The last line of an NDJSON answer: how the stream ended. Code 0 (OK) means every line was answered; otherwise (e.g. 4 DEADLINE_EXCEEDED, 14 UNAVAILABLE while the server drains) the lines without an answer were not read: send them again.",
        "required": ["end"],
        "properties": {"end": {"type": "object", "properties": {
            "code": {"type": "integer"},
            "status": {"type": "string"},
            "message": {"type": "string"}
        }}}
    })
}

/// The operation of one route: its summary and description (with its RPC's), request,
/// answers, deadline parameters and security.
fn operation(r: &Route, rpc_docs: &HashMap<String, String>) -> Value {
    let mut description = r.summary.to_string();
    if let Some(rpc) = r.rpc {
        description.push_str(&format!(
            "\n\nThe HTTP form of gRPC `{PACKAGE}.Tidings/{rpc}`: {}",
            rpc_docs.get(rpc).map_or("", String::as_str)
        ));
    }
    let mut op = json!({
        "operationId": r.operation_id,
        "summary": r.summary.split(". ").next().unwrap_or(r.summary).trim_end_matches('.'),
        "description": description,
        "responses": {},
    });
    let (media, schema) = r.response;
    op["responses"]["200"] =
        json!({"description": "OK", "content": {media: response_body(media, schema)}});
    if let Some((media, name)) = r.request {
        op["requestBody"] = json!({
            "required": true,
            "content": {media: {"schema": {"$ref": format!("#/components/schemas/{name}")}}},
        });
    }
    error_responses(r, &mut op["responses"]);
    if r.deadline {
        op["parameters"] = json!([
            {"$ref": "#/components/parameters/timeout"},
            {"$ref": "#/components/parameters/grpcTimeout"}
        ]);
    }
    // The token is needed only when the server was started with one.
    op["security"] = if r.auth {
        json!([{"bearer": []}, {}])
    } else {
        json!([{}])
    };
    op
}

/// The content of a successful answer of type `media`, of the schema `schema` names.
fn response_body(media: &str, schema: Option<&str>) -> Value {
    match schema {
        // An NDJSON answer: items, then the line saying how the stream ended.
        Some(name) if media == "application/x-ndjson" => json!({"schema": {
            "description": "Each line is one of these JSON objects.",
            "oneOf": [
                {"$ref": format!("#/components/schemas/{name}")},
                {"$ref": "#/components/schemas/StreamEnd"}
            ]
        }}),
        Some(name) => json!({"schema": {"$ref": format!("#/components/schemas/{name}")}}),
        None if media == "text/html" => json!({"schema": {"type": "string"}}),
        None => json!({"schema": {"type": "object"}}),
    }
}

/// Adds the failure answers of route `r` to its `responses`: the error body for an RPC's
/// route (with 413 and 415 when it takes a body), and `/readyz`'s 503 while draining.
fn error_responses(r: &Route, responses: &mut Value) {
    if r.rpc.is_some() {
        responses["default"] = json!({"$ref": "#/components/responses/Error"});
        for code in ["400", "401", "429", "503", "504"] {
            responses[code] = json!({"$ref": "#/components/responses/Error"});
        }
        if r.request.is_some() {
            for code in ["413", "415"] {
                responses[code] = json!({"$ref": "#/components/responses/Error"});
            }
        }
    }
    if r.operation_id == "readyz" {
        responses["503"] = json!({
            "description": "Draining for shutdown: send new work elsewhere.",
            "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string", "const": "NOT_SERVING"}}}}}
        });
    }
}

/// The document's `components`: `schemas`, and the shared error answer, deadline parameters
/// and bearer scheme.
fn components(schemas: Map<String, Value>) -> Value {
    json!({
        "schemas": schemas,
        "responses": {
            "Error": {
                "description": "The call failed; the body says why.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            }
        },
        "parameters": {
            "timeout": {
                "name": "timeout", "in": "query", "required": false,
                "description": "The call's deadline, e.g. 2s, 1.5s, 250ms or 1m. For analyze and analyze:batch it is capped by the server's request timeout, and past it the call fails with 504 DEADLINE_EXCEEDED; for analyze:stream it bounds the whole stream, which then ends with a StreamEnd line of code 4.",
                "schema": {"type": "string", "pattern": "^[0-9.]+(ms|s|m|h)$"}
            },
            "grpcTimeout": {
                "name": "Grpc-Timeout", "in": "header", "required": false,
                "description": "The deadline in gRPC's format (e.g. 2S, 250m), as grpc-gateway takes it; the `timeout` parameter wins when both are set.",
                "schema": {"type": "string", "pattern": "^[0-9]{1,8}[HMSmun]$"}
            }
        },
        "securitySchemes": {
            "bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Required when the server runs with --auth-token-file: `Authorization: Bearer <token>`."
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_every_route_and_resolves_every_reference() {
        let doc = document(crate::proto::FILE_DESCRIPTOR_SET);
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.method.to_ascii_lowercase()];
            assert!(op.is_object(), "{} {} is missing", r.method, r.path);
        }
        // Comments of the proto became descriptions.
        let req = &doc["components"]["schemas"]["AnalyzeRequest"];
        assert!(req["description"].as_str().unwrap().contains("article"));
        assert!(req["properties"]["entityTypes"]["description"]
            .as_str()
            .unwrap()
            .contains("PER"));
        assert_eq!(req["properties"]["minEntityScore"]["type"], "number");
        let timing = &doc["components"]["schemas"]["Timing"]["properties"]["totalUs"];
        assert_eq!(timing["format"], "uint64");
        let text = serde_json::to_string(&doc).unwrap();
        for piece in text.split("\"#/components/").skip(1) {
            let path = piece.split('"').next().unwrap();
            let mut node = &doc["components"];
            for part in path.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling reference #/components/{path}");
        }
    }
}
