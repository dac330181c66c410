//! The HTTP API's OpenAPI 3.1 document (`GET /v1/openapi.json`), for clients generated from it
//! and for people reading it.
//!
//! It is made from the sd.v1 descriptors the binary already carries for gRPC reflection, so it
//! cannot drift from the proto: every message a route takes or gives becomes a JSON Schema of
//! its protobuf JSON mapping as pbjson writes it (lowerCamelCase names, 64-bit integers as
//! strings, bytes in base64, enums by name), with the proto's comments as descriptions.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::OnceLock;

const PACKAGE: &str = "sd.v1";
const SCHEMAS: &str = "#/components/schemas/";

/// The document, made once.
pub fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let files = prost_types::FileDescriptorSet::decode(sdmesh_proto::FILE_DESCRIPTOR_SET)
            .expect("the sd.v1 descriptors built into the binary decode");
        build(&files.file)
    })
}

fn build(files: &[FileDescriptorProto]) -> Value {
    let mut all = BTreeMap::new();
    for file in files.iter().filter(|f| f.package() == PACKAGE) {
        let comments = Comments::of(file);
        for (i, message) in file.message_type.iter().enumerate() {
            message_schemas(message, "", &[4, i as i32], &comments, &mut all);
        }
        for (i, enumeration) in file.enum_type.iter().enumerate() {
            all.insert(enumeration.name().to_string(), enum_schema(enumeration, &[5, i as i32], &comments));
        }
    }
    all.insert("Error".into(), error_schema());
    let (paths, responses) = (paths(), responses());
    // Only what the routes reach (not the model services' messages).
    let mut used = BTreeMap::new();
    let mut pending = Vec::new();
    refs(&paths, &mut pending);
    refs(&responses, &mut pending);
    while let Some(name) = pending.pop() {
        if used.contains_key(&name) {
            continue;
        }
        let schema = all.remove(&name).unwrap_or_else(|| panic!("no schema named {name}"));
        refs(&schema, &mut pending);
        used.insert(name, schema);
    }
    json!({
        "openapi": "3.1.1",
        "info": {
            "title": "sdmesh HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stable Diffusion 2.x jobs over HTTP/JSON. Each route runs the gRPC \
                method of the same name (sd.v1.Orchestrator), so validation, admission, quotas and \
                results are the same. Bodies are the protobuf JSON mapping of the sd.v1 messages: \
                field names in lowerCamelCase (the proto's snake_case names are accepted too), \
                64-bit integers as strings, bytes in base64, enums by name.",
        },
        "paths": paths,
        "components": {
            "schemas": used,
            "responses": responses,
            "securitySchemes": {"apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key, when the orchestrator runs with --api-keys-file: each call to \
                    /v1/generate, /v1/generate/stream and /v1/models then sends `Authorization: Bearer KEY`, \
                    and runs for the key's tenant.",
            }},
        },
    })
}

/// The error answers the routes refer to.
fn responses() -> Value {
    json!({
        "Unauthenticated": {
            "description": "UNAUTHENTICATED: the orchestrator needs an API key and the call sent none, \
                or one it does not know.",
            "headers": {"WWW-Authenticate": {"description": "Bearer.", "schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"$ref": format!("{SCHEMAS}Error")}}},
        },
        "Error": {
            "description": "The job failed: the HTTP status of its gRPC code (400 for the caller's \
                mistakes, 503 for a retryable outage, 504 past the deadline, 499 when the caller \
                went away, 500 for a bug).",
            "content": {"application/json": {"schema": {"$ref": format!("{SCHEMAS}Error")}}},
        },
        "Backpressure": {
            "description": "RESOURCE_EXHAUSTED: the orchestrator, the tenant's quota or the model \
                services are full. Retry after the hint.",
            "headers": {"Retry-After": {
                "description": "Whole seconds to wait before trying again.",
                "schema": {"type": "integer", "minimum": 1},
            }},
            "content": {"application/json": {"schema": {"$ref": format!("{SCHEMAS}Error")}}},
        },
    })
}

/// The proto comments of one file, by their location's path (descriptor.proto's numbering).
struct Comments(BTreeMap<Vec<i32>, String>);

impl Comments {
    fn of(file: &FileDescriptorProto) -> Self {
        let locations = file.source_code_info.iter().flat_map(|info| &info.location);
        Comments(
            locations
                .filter_map(|l| {
                    let text = l.leading_comments.as_deref().or(l.trailing_comments.as_deref())?;
                    let text = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n");
                    (!text.is_empty()).then(|| (l.path.clone(), text))
                })
                .collect(),
        )
    }

    fn at(&self, path: &[i32]) -> Option<&str> {
        self.0.get(path).map(String::as_str)
    }
}

fn described(mut schema: Value, description: Option<&str>) -> Value {
    if let Some(text) = description {
        schema["description"] = json!(text);
    }
    schema
}

/// The schema of `message` (and of the messages and enums nested in it), named as in the proto
/// (`Outer.Inner` for nested ones).
fn message_schemas(
    message: &DescriptorProto,
    outer: &str,
    path: &[i32],
    comments: &Comments,
    out: &mut BTreeMap<String, Value>,
) {
    let name = format!("{outer}{}", message.name());
    let mut properties = Map::new();
    let mut oneofs: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for (j, field) in message.field.iter().enumerate() {
        let schema = field_schema(field, message);
        let field_path = [path, &[2, j as i32]].concat();
        properties.insert(field.json_name().to_string(), described(schema, comments.at(&field_path)));
        // A real oneof (proto3 `optional` is a synthetic one of a single field).
        if let (Some(index), false) = (field.oneof_index, field.proto3_optional()) {
            oneofs.entry(index).or_default().push(field.json_name().to_string());
        }
    }
    let mut schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
    // At most one member of each oneof is set.
    let pairs: Vec<Value> = oneofs
        .values()
        .flat_map(|members| {
            members
                .iter()
                .enumerate()
                .flat_map(move |(i, a)| members[i + 1..].iter().map(move |b| json!({"required": [a, b]})))
        })
        .collect();
    if !pairs.is_empty() {
        schema["not"] = json!({"anyOf": pairs});
    }
    out.insert(name.clone(), described(schema, comments.at(path)));
    for (k, nested) in message.nested_type.iter().enumerate() {
        if !is_map_entry(nested) {
            message_schemas(nested, &format!("{name}."), &[path, &[3, k as i32]].concat(), comments, out);
        }
    }
    for (k, enumeration) in message.enum_type.iter().enumerate() {
        let schema = enum_schema(enumeration, &[path, &[4, k as i32]].concat(), comments);
        out.insert(format!("{name}.{}", enumeration.name()), schema);
    }
}

fn is_map_entry(message: &DescriptorProto) -> bool {
    message.options.as_ref().is_some_and(|o| o.map_entry())
}

/// A field's schema in the JSON mapping.
fn field_schema(field: &FieldDescriptorProto, within: &DescriptorProto) -> Value {
    let single = match field.r#type() {
        Type::Double | Type::Float => json!({"type": "number"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Type::Uint32 | Type::Fixed32 => json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}),
        // pbjson writes 64-bit integers as strings (JavaScript numbers hold 53 bits) and reads both.
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
            json!({"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"})
        }
        Type::Uint64 | Type::Fixed64 => {
            json!({"type": ["string", "integer"], "format": "uint64", "pattern": "^[0-9]+$", "minimum": 0})
        }
        Type::Bool => json!({"type": "boolean"}),
        Type::String => json!({"type": "string"}),
        Type::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Type::Enum | Type::Message | Type::Group => {
            let local = local_name(field.type_name());
            // A map<K, V> field is a nested entry message: a JSON object keyed by K's text.
            let entry = within
                .nested_type
                .iter()
                .find(|n| is_map_entry(n) && local == format!("{}.{}", within.name(), n.name()));
            if let Some(entry) = entry {
                let value = entry.field.iter().find(|f| f.number() == 2).expect("a map entry has a value field");
                return json!({"type": "object", "additionalProperties": field_schema(value, entry)});
            }
            json!({"$ref": format!("{SCHEMAS}{local}")})
        }
    };
    if field.label() == Label::Repeated {
        json!({"type": "array", "items": single})
    } else {
        single
    }
}

/// `.sd.v1.Outer.Inner` -> `Outer.Inner`.
fn local_name(type_name: &str) -> String {
    type_name.trim_start_matches('.').strip_prefix(&format!("{PACKAGE}.")).unwrap_or(type_name).to_string()
}

fn enum_schema(enumeration: &EnumDescriptorProto, path: &[i32], comments: &Comments) -> Value {
    let names: Vec<&str> = enumeration.value.iter().map(|v| v.name()).collect();
    let mut text: Vec<String> = comments.at(path).map(str::to_string).into_iter().collect();
    for (j, value) in enumeration.value.iter().enumerate() {
        if let Some(comment) = comments.at(&[path, &[2, j as i32]].concat()) {
            text.push(format!("- {}: {}", value.name(), comment.replace('\n', " ")));
        }
    }
    let description = (!text.is_empty()).then(|| text.join("\n"));
    described(json!({"type": "string", "enum": names}), description.as_deref())
}

/// The body of every error: `{"error": {"code", "status", "message"}}`.
fn error_schema() -> Value {
    let statuses: Vec<String> = (0..=16).map(|i| crate::http_api::status_name(tonic::Code::from_i32(i))).collect();
    json!({
        "type": "object",
        "required": ["error"],
        "additionalProperties": false,
        "properties": {"error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "additionalProperties": false,
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status."},
                "status": {"type": "string", "enum": statuses, "description": "The gRPC status code's name."},
                "message": {"type": "string", "description": "What was wrong, and what is allowed."},
            },
        }},
    })
}

/// The routes (see `http_api`).
fn paths() -> Value {
    let schema = |name: &str| json!({"$ref": format!("{SCHEMAS}{name}")});
    let header = |name: &str, description: &str, schema: Value| json!({"name": name, "in": "header", "required": false, "description": description, "schema": schema});
    let job_headers = json!([
        header(
            "x-sdmesh-tenant",
            "Who the job is for: places are shared fairly between tenants, and per-tenant limits \
             and metrics count by it. Unset = the anonymous tenant. With API keys, a tenant's key \
             sets it (naming another is 403), a gateway's key (any_tenant) passes it on.",
            json!({"type": "string"})
        ),
        header(
            "x-sdmesh-priority",
            "A freed place goes to the highest priority waiting; in a full line a job takes the place \
             of the latest lower-priority one. Unset = normal.",
            json!({"type": "string", "enum": ["high", "normal", "low"]})
        ),
        header(
            "grpc-timeout",
            "The job's deadline, as gRPC writes it: up to 8 digits and a unit (H, M, S, m, u, n), e.g. 30S.",
            json!({"type": "string", "pattern": "^[0-9]{1,8}[HMSmun]$"})
        ),
        header("traceparent", "W3C trace context: the job's spans join the caller's trace.", json!({"type": "string"})),
    ]);
    let request_body =
        json!({"required": true, "content": {"application/json": {"schema": schema("GenerateRequest")}}});
    let errors = json!({
        "400": {"$ref": "#/components/responses/Error"},
        "401": {"$ref": "#/components/responses/Unauthenticated"},
        "403": {"$ref": "#/components/responses/Error"},
        "429": {"$ref": "#/components/responses/Backpressure"},
        "503": {"$ref": "#/components/responses/Error"},
        "504": {"$ref": "#/components/responses/Error"},
        "default": {"$ref": "#/components/responses/Error"},
    });
    let with_errors = |ok: Value| {
        let mut responses = errors.clone();
        responses["200"] = ok;
        responses
    };
    let image = json!({"schema": {"type": "string", "format": "binary"}});
    let health = json!({"type": "object", "properties": {"status": {"enum": ["SERVING", "NOT_SERVING"]}},
        "required": ["status"], "additionalProperties": false});
    // A key where the orchestrator asks for one (--api-keys-file), else none.
    let secured = json!([{}, {"apiKey": []}]);
    json!({
        "/v1/generate": {"post": {
            "operationId": "generate",
            "summary": "Run one job and answer its result.",
            "description": "With `Accept: image/png` or `image/jpeg` (and one image), the answer is the \
                image itself, its seed in `x-sdmesh-seed`.",
            "parameters": job_headers,
            "requestBody": request_body,
            "security": secured,
            "responses": with_errors(json!({
                "description": "The job's result.",
                "headers": {
                    "x-sdmesh-seed": {"description": "With an image answer: the seed that drew it.",
                        "schema": {"type": "string"}},
                    "x-sdmesh-flagged": {"description": "With an image answer: whether the safety checker \
                        flagged it.", "schema": {"type": "string", "enum": ["true", "false"]}},
                },
                "content": {
                    "application/json": {"schema": schema("GenerateResponse")},
                    "image/png": image,
                    "image/jpeg": image,
                },
            })),
        }},
        "/v1/generate/stream": {"post": {
            "operationId": "generateStream",
            "summary": "Run one job, answering its progress and then its result as Server-Sent Events.",
            "description": "Each event's `data` is one GenerateEvent in JSON (waiting, progress after each \
                step, the result last); a failure mid-job is an event named `error` whose data is an \
                Error. Closing the connection cancels the job.",
            "parameters": job_headers,
            "requestBody": request_body,
            "security": secured,
            "responses": with_errors(json!({
                "description": "The job's events.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "x-sdmesh-event-data": schema("GenerateEvent"),
            })),
        }},
        "/v1/models": {"get": {
            "operationId": "listModels",
            "summary": "The models this orchestrator serves (GenerateRequest.model picks one).",
            "security": secured,
            "responses": {
                "401": {"$ref": "#/components/responses/Unauthenticated"},
                "200": {"description": "The default model first.",
                    "content": {"application/json": {"schema": schema("ListModelsResponse")}}},
                "503": {"$ref": "#/components/responses/Error"},
            },
        }},
        "/healthz": {"get": {
            "operationId": "healthz",
            "summary": "Whether the orchestrator takes jobs, for load balancers without gRPC health.",
            "responses": {
                "200": {"description": "It takes jobs.", "content": {"application/json": {"schema": health.clone()}}},
                "503": {"description": "It waits for its model services, or drains.",
                    "content": {"application/json": {"schema": health}}},
            },
        }},
        "/v1/openapi.json": {"get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {"200": {"description": "OpenAPI 3.1.",
                "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
    })
}

/// Every `#/components/schemas/` name `value` refers to.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(name) = map.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix(SCHEMAS)) {
                out.push(name.to_string());
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdmesh_proto::v1;

    /// A validator of `name`'s schema, `$ref`s resolved within the document.
    fn validator(name: &str) -> jsonschema::Validator {
        let root = json!({"$ref": format!("{SCHEMAS}{name}"), "components": document()["components"]});
        jsonschema::draft202012::new(&root).expect("the document's schemas compile")
    }

    fn errors(name: &str, value: &Value) -> Vec<String> {
        validator(name).iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect()
    }

    /// Every field of every message in `value` is set, so validating it checks every field's
    /// mapping (pbjson leaves fields at their default out).
    fn assert_every_field_set(schema_name: &str, value: &Value) {
        let schema = &document()["components"]["schemas"][schema_name];
        let Some(properties) = schema["properties"].as_object() else { return };
        let set = value.as_object().expect("an object");
        let oneof = schema.get("not").is_some();
        for (field, field_schema) in properties {
            let Some(inner) = set.get(field) else {
                assert!(oneof, "{schema_name}.{field} is not set in the test's message");
                continue;
            };
            let reference = field_schema["$ref"].as_str().or(field_schema["items"]["$ref"].as_str());
            if let Some(name) = reference.and_then(|r| r.strip_prefix(SCHEMAS)) {
                for item in inner.as_array().cloned().unwrap_or_else(|| vec![inner.clone()]) {
                    if item.is_object() {
                        assert_every_field_set(name, &item);
                    }
                }
            }
        }
    }

    fn tensor() -> Option<v1::Tensor> {
        Some(v1::Tensor { dtype: v1::Dtype::F32.into(), shape: vec![1, 2], data: vec![0u8; 8].into() })
    }

    fn full_request() -> v1::GenerateRequest {
        v1::GenerateRequest {
            prompt: "a lighthouse".into(),
            negative_prompt: "fog".into(),
            steps: Some(20),
            guidance_scale: Some(7.5),
            guidance_rescale: 0.7,
            seed: Some(u64::MAX),
            height: Some(512),
            width: Some(768),
            num_images: Some(2),
            scheduler: Some(v1::SchedulerOptions {
                name: "dpm++2m".into(),
                eta: Some(0.5),
                use_karras_sigmas: Some(true),
            }),
            init_latents: tensor(),
            return_array: true,
            task: v1::Task::Inpaint.into(),
            image: vec![1, 2, 3].into(),
            mask: vec![4, 5].into(),
            strength: Some(0.75),
            depth_map: tensor(),
            noise_level: Some(20),
            upscale: Some(v1::ChainedUpscale { steps: Some(75), guidance_scale: Some(9.0), noise_level: Some(20) }),
            safety: v1::SafetyPolicy::Flag.into(),
            model: "sd2-inpaint".into(),
            image_format: v1::ImageFormat::Jpeg.into(),
            jpeg_quality: Some(85),
            preview_every: 5,
            preview_kind: v1::PreviewKind::Decoded.into(),
        }
    }

    fn full_response() -> v1::GenerateResponse {
        v1::GenerateResponse {
            images: vec![v1::GeneratedImage {
                png: vec![137, 80],
                width: 768,
                height: 512,
                flagged: true,
                checked: true,
                jpeg: vec![255, 216],
            }],
            seed: 1 << 60,
            scheduler: "DPMSolverMultistepScheduler".into(),
            array: tensor(),
            warnings: vec!["prompt truncated".into()],
            parameters: "a lighthouse\nSteps: 20".into(),
        }
    }

    #[test]
    fn the_routes_messages_are_documented_with_the_protos_comments() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let names: Vec<&str> = schemas.keys().map(String::as_str).collect();
        for name in ["GenerateRequest", "GenerateResponse", "GenerateEvent", "Progress", "Waiting", "Tensor", "Dtype"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        for name in ["ListModelsResponse", "ServedModel", "SchedulerOptions", "ChainedUpscale", "Task", "Error"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        assert!(!names.contains(&"DenoiseRequest"), "the model services' messages are not the HTTP API's");
        let request = &schemas["GenerateRequest"]["properties"];
        assert!(request["negativePrompt"].is_object(), "lowerCamelCase names");
        assert!(request["steps"]["description"].as_str().unwrap().contains("Unset = default (50)"));
        assert_eq!(request["task"]["$ref"], "#/components/schemas/Task");
        assert!(schemas["Task"]["enum"].as_array().unwrap().contains(&json!("TASK_DEPTH2IMG")));
        assert!(schemas["SafetyPolicy"]["description"]
            .as_str()
            .unwrap()
            .contains("- SAFETY_POLICY_OFF: Do not check."));
        assert!(schemas["Waiting"]["description"].as_str().unwrap().starts_with("The job waits for a place"));
        assert_eq!(
            doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/GenerateRequest"
        );
    }

    #[test]
    fn pbjsons_json_of_every_field_validates() {
        let request = serde_json::to_value(full_request()).unwrap();
        assert_every_field_set("GenerateRequest", &request);
        assert_eq!(errors("GenerateRequest", &request), Vec::<String>::new(), "{request}");
        assert_eq!(request["seed"], json!(u64::MAX.to_string()), "64-bit integers are strings");

        let response = serde_json::to_value(full_response()).unwrap();
        assert_every_field_set("GenerateResponse", &response);
        assert_eq!(errors("GenerateResponse", &response), Vec::<String>::new(), "{response}");

        use v1::generate_event::Event;
        let events = [
            Event::Waiting(v1::Waiting { jobs_ahead: 3, jobs_running: 2 }),
            Event::Progress(v1::Progress {
                step: 4,
                total_steps: 20,
                timestep: 801.0,
                restarts: 1,
                preview: vec![255, 216],
            }),
            Event::Result(full_response()),
        ];
        for event in events {
            let value = serde_json::to_value(v1::GenerateEvent { event: Some(event) }).unwrap();
            assert_every_field_set("GenerateEvent", &value);
            assert_eq!(errors("GenerateEvent", &value), Vec::<String>::new(), "{value}");
        }

        let models = v1::ListModelsResponse {
            models: vec![v1::ServedModel {
                name: "sd21".into(),
                is_default: true,
                tasks: vec!["txt2img".into()],
                native_height: 768,
                native_width: 768,
                prediction_type: "v_prediction".into(),
                chains_upscale: true,
            }],
        };
        let value = serde_json::to_value(models).unwrap();
        assert_every_field_set("ListModelsResponse", &value);
        assert_eq!(errors("ListModelsResponse", &value), Vec::<String>::new());

        for code in [tonic::Code::InvalidArgument, tonic::Code::ResourceExhausted, tonic::Code::Ok] {
            let body = crate::http_api::error_body(&tonic::Status::new(code, "why"));
            assert_eq!(errors("Error", &body), Vec::<String>::new(), "{body}");
        }
    }

    #[test]
    fn what_the_api_would_not_read_or_write_does_not_validate() {
        let valid = serde_json::to_value(full_request()).unwrap();
        for (field, bad) in [
            ("steps", json!("many")),
            ("steps", json!(-1)),
            ("seed", json!("12a")),
            ("task", json!("TASK_PAINT")),
            ("stepz", json!(4)),
            ("scheduler", json!({"name": "ddim", "etaa": 0})),
            ("initLatents", json!({"dtype": "DTYPE_F32", "shape": ["x"]})),
            ("prompt", json!(7)),
        ] {
            let mut value = valid.clone();
            value[field] = bad.clone();
            assert!(!errors("GenerateRequest", &value).is_empty(), "{field}: {bad} validated");
        }
        let two = json!({"progress": {"step": 1}, "result": {}});
        assert!(!errors("GenerateEvent", &two).is_empty(), "two members of a oneof validated");
        let error = json!({"error": {"code": 400, "status": "INVALID", "message": "x"}});
        assert!(!errors("Error", &error).is_empty());
    }
}
