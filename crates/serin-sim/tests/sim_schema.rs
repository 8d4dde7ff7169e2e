//! CRD schema handling of the simulated API server against the real upstream Gateway API and
//! Istio CRDs (fixtures outside the repository), plus a hand-written schema using every keyword.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_sim::fixtures;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{json, Value};
use serin_sim::schema::{
    cel_rules, check_crd_schema, validate_and_prune, validate_and_prune_traced, FieldError,
    ValidationOutcome,
};

fn fixtures_dir() -> PathBuf {
    fixtures::upstream_crds().unwrap_or_else(|why| panic!("{why}"))
}

/// (version name, openAPIV3Schema) of each served version of the CRD(s) in a fixture file.
fn served_schemas(file: &str) -> Vec<(String, Value)> {
    let path = fixtures_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let crd: Value = match serde::Deserialize::deserialize(document) {
            Ok(v) => v,
            Err(e) => panic!("fixture {} is not YAML: {e}", path.display()),
        };
        if crd.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
            continue;
        }
        for version in crd["spec"]["versions"].as_array().into_iter().flatten() {
            if version["served"] == json!(true) {
                out.push((
                    version["name"].as_str().unwrap_or_default().to_string(),
                    version["schema"]["openAPIV3Schema"].clone(),
                ));
            }
        }
    }
    assert!(!out.is_empty(), "no served versions in {}", path.display());
    out
}

fn validate_all_versions(
    file: &str,
    group: &str,
    object: &Value,
) -> Vec<(String, ValidationOutcome, Value)> {
    served_schemas(file)
        .into_iter()
        .map(|(version, schema)| {
            let mut candidate = object.clone();
            candidate["apiVersion"] = json!(format!("{group}/{version}"));
            let outcome = validate_and_prune(&schema, &mut candidate, None);
            (version, outcome, candidate)
        })
        .collect()
}

fn assert_clean(file: &str, group: &str, object: &Value) {
    for (version, outcome, _) in validate_all_versions(file, group, object) {
        assert!(
            outcome.errors.is_empty(),
            "{file} {version}: unexpected errors {:#?}",
            outcome.errors
        );
        assert!(
            outcome.pruned_fields.is_empty(),
            "{file} {version}: unexpected pruning {:?}",
            outcome.pruned_fields
        );
    }
}

fn http_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "public-gw", "namespace": "infra", "sectionName": "http"}],
            "hostnames": ["shop.example.com"],
            "rules": [{
                "matches": [{
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "headers": [{"type": "Exact", "name": "x-canary", "value": "true"}],
                    "method": "GET"
                }],
                "filters": [{
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"set": [{"name": "x-route", "value": "shop"}], "remove": ["x-debug"]}
                }],
                "backendRefs": [
                    {"name": "shop-stable", "port": 8080, "weight": 90},
                    {"name": "shop-canary", "port": 8080, "weight": 10}
                ]
            }]
        }
    })
}

fn errors_of(file: &str, group: &str, object: &Value) -> Vec<(String, Vec<FieldError>)> {
    validate_all_versions(file, group, object)
        .into_iter()
        .map(|(version, outcome, _)| (version, outcome.errors))
        .collect()
}

/// Every served version reports exactly one error, at `path` with `reason`.
fn assert_single_error(
    file: &str,
    group: &str,
    object: &Value,
    path: &str,
    reason: &str,
) -> String {
    let mut message = String::new();
    for (version, errors) in errors_of(file, group, object) {
        assert_eq!(errors.len(), 1, "{file} {version}: {errors:#?}");
        assert_eq!(errors[0].path, path, "{file} {version}: {errors:#?}");
        assert_eq!(errors[0].reason, reason, "{file} {version}: {errors:#?}");
        message = errors[0].message.clone();
    }
    message
}

const ROUTES: &str = "gateway-api-httproutes.yaml";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const VIRTUAL_SERVICES: &str = "istio-virtualservices.yaml";
const DESTINATION_RULES: &str = "istio-destinationrules.yaml";
const ISTIO_GROUP: &str = "networking.istio.io";

#[test]
fn upstream_schemas_are_structural() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("upstream_schemas_are_structural") else {
        return;
    };
    for file in [
        ROUTES,
        VIRTUAL_SERVICES,
        DESTINATION_RULES,
        "gateway-api-gateways.yaml",
        "gateway-api-gatewayclasses.yaml",
        "gateway-api-referencegrants.yaml",
    ] {
        for (version, schema) in served_schemas(file) {
            let errors = check_crd_schema(&schema);
            assert!(errors.is_empty(), "{file} {version}: {errors:#?}");
        }
    }
}

#[test]
fn valid_http_route_passes_and_gets_defaults() {
    let Some(_fixtures) =
        fixtures::upstream_crds_or_skip("valid_http_route_passes_and_gets_defaults")
    else {
        return;
    };
    assert_clean(ROUTES, GATEWAY_GROUP, &http_route());
    for (_, _, defaulted) in validate_all_versions(ROUTES, GATEWAY_GROUP, &http_route()) {
        let backend = &defaulted["spec"]["rules"][0]["backendRefs"][0];
        assert_eq!(backend["kind"], "Service", "backendRef kind is defaulted");
        assert_eq!(backend["group"], "", "backendRef group is defaulted");
    }
}

#[test]
fn http_route_unknown_fields_are_pruned() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("http_route_unknown_fields_are_pruned")
    else {
        return;
    };
    let mut route = http_route();
    route["spec"]["rules"][0]["backendRefs"][1]["canaryHint"] = json!(true);
    route["spec"]["surprise"] = json!({"a": 1});
    for (version, outcome, pruned) in validate_all_versions(ROUTES, GATEWAY_GROUP, &route) {
        assert!(
            outcome.errors.is_empty(),
            "{version}: {:#?}",
            outcome.errors
        );
        let mut fields = outcome.pruned_fields.clone();
        fields.sort();
        assert_eq!(
            fields,
            vec!["spec.rules[0].backendRefs[1].canaryHint", "spec.surprise"],
            "{version}"
        );
        assert!(pruned["spec"].get("surprise").is_none());
        assert!(pruned["spec"]["rules"][0]["backendRefs"][1]
            .get("canaryHint")
            .is_none());
    }
}

#[test]
fn http_route_weight_out_of_range() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("http_route_weight_out_of_range") else {
        return;
    };
    let weight_path = "spec.rules[0].backendRefs[1].weight";
    let mut route = http_route();
    route["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(-1);
    let message = assert_single_error(
        ROUTES,
        GATEWAY_GROUP,
        &route,
        weight_path,
        "FieldValueInvalid",
    );
    assert!(message.contains("greater than or equal to 0"), "{message}");
    route["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(1_000_001);
    let message = assert_single_error(
        ROUTES,
        GATEWAY_GROUP,
        &route,
        weight_path,
        "FieldValueInvalid",
    );
    assert!(
        message.contains("less than or equal to 1e6") || message.contains("1000000"),
        "{message}"
    );
    route["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(1_000_000);
    assert_clean(ROUTES, GATEWAY_GROUP, &route);
}

#[test]
fn http_route_wrong_type_and_missing_required() {
    let Some(_fixtures) =
        fixtures::upstream_crds_or_skip("http_route_wrong_type_and_missing_required")
    else {
        return;
    };
    let mut route = http_route();
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!("ninety");
    let message = assert_single_error(
        ROUTES,
        GATEWAY_GROUP,
        &route,
        "spec.rules[0].backendRefs[0].weight",
        "FieldValueTypeInvalid",
    );
    assert!(message.contains("must be of type integer"), "{message}");

    let mut route = http_route();
    route["spec"]["parentRefs"][0]
        .as_object_mut()
        .map(|p| p.remove("name"));
    assert_single_error(
        ROUTES,
        GATEWAY_GROUP,
        &route,
        "spec.parentRefs[0].name",
        "FieldValueRequired",
    );

    let mut route = http_route();
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = json!("Glob");
    let errors = errors_of(ROUTES, GATEWAY_GROUP, &route);
    for (version, errors) in errors {
        assert!(
            errors
                .iter()
                .any(|e| e.path == "spec.rules[0].matches[0].path.type"
                    && e.reason == "FieldValueNotSupported"),
            "{version}: {errors:#?}"
        );
    }
}

#[test]
fn http_route_cel_rule_violation() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("http_route_cel_rule_violation") else {
        return;
    };
    let mut route = http_route();
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("api");
    let message = assert_single_error(
        ROUTES,
        GATEWAY_GROUP,
        &route,
        "spec.rules[0].matches[0].path",
        "FieldValueInvalid",
    );
    assert!(message.contains("must be an absolute path"), "{message}");

    // A filter whose type disagrees with the field it sets.
    let mut route = http_route();
    route["spec"]["rules"][0]["filters"][0]["type"] = json!("ResponseHeaderModifier");
    for (version, errors) in errors_of(ROUTES, GATEWAY_GROUP, &route) {
        assert!(
            !errors.is_empty(),
            "{version}: filter type mismatch must be rejected"
        );
        assert!(
            errors.iter().all(|e| e.path == "spec.rules[0].filters[0]"),
            "{version}: {errors:#?}"
        );
    }
}

fn virtual_service() -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {
            "hosts": ["reviews.prod.svc.cluster.local"],
            "gateways": ["mesh"],
            "http": [{
                "name": "canary",
                "match": [{"uri": {"prefix": "/reviews"}, "headers": {"x-canary": {"exact": "true"}}}],
                "route": [
                    {"destination": {"host": "reviews", "subset": "stable", "port": {"number": 9080}}, "weight": 80},
                    {"destination": {"host": "reviews", "subset": "canary", "port": {"number": 9080}}, "weight": 20}
                ],
                "mirror": {"host": "reviews-shadow", "subset": "canary"},
                "mirrorPercentage": {"value": 25.0},
                "timeout": "5s",
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"}
            }]
        }
    })
}

fn destination_rule() -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": {
            "host": "reviews.prod.svc.cluster.local",
            "workloadSelector": {"matchLabels": {"app": "reviews"}},
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "30ms"}},
                "outlierDetection": {"consecutive5xxErrors": 7, "interval": "5m", "baseEjectionTime": "15m"}
            },
            "subsets": [
                {"name": "stable", "labels": {"rollouts-pod-template-hash": "abc123"}},
                {"name": "canary", "labels": {"rollouts-pod-template-hash": "def456"},
                 "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}
            ]
        }
    })
}

#[test]
fn valid_istio_objects_pass() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("valid_istio_objects_pass") else {
        return;
    };
    assert_clean(VIRTUAL_SERVICES, ISTIO_GROUP, &virtual_service());
    assert_clean(DESTINATION_RULES, ISTIO_GROUP, &destination_rule());
}

#[test]
fn istio_unknown_fields_pruned_and_invalid_values_rejected() {
    let Some(_fixtures) =
        fixtures::upstream_crds_or_skip("istio_unknown_fields_pruned_and_invalid_values_rejected")
    else {
        return;
    };
    let mut vs = virtual_service();
    vs["spec"]["http"][0]["route"][0]["canaryWeight"] = json!(5);
    for (version, outcome, _) in validate_all_versions(VIRTUAL_SERVICES, ISTIO_GROUP, &vs) {
        assert!(
            outcome.errors.is_empty(),
            "{version}: {:#?}",
            outcome.errors
        );
        assert_eq!(
            outcome.pruned_fields,
            vec!["spec.http[0].route[0].canaryWeight"],
            "{version}"
        );
    }

    let mut vs = virtual_service();
    vs["spec"]["http"][0]["route"][1]["weight"] = json!("twenty");
    assert_single_error(
        VIRTUAL_SERVICES,
        ISTIO_GROUP,
        &vs,
        "spec.http[0].route[1].weight",
        "FieldValueTypeInvalid",
    );

    // Istio's CEL rule: durations must be at least 1ms.
    let mut vs = virtual_service();
    vs["spec"]["http"][0]["timeout"] = json!("500us");
    let message = assert_single_error(
        VIRTUAL_SERVICES,
        ISTIO_GROUP,
        &vs,
        "spec.http[0].timeout",
        "FieldValueInvalid",
    );
    assert!(message.contains("1ms"), "{message}");

    let mut dr = destination_rule();
    dr["spec"]["subsets"][0]
        .as_object_mut()
        .map(|s| s.remove("name"));
    assert_single_error(
        DESTINATION_RULES,
        ISTIO_GROUP,
        &dr,
        "spec.subsets[0].name",
        "FieldValueRequired",
    );
}

fn gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "public-gw"},
        "spec": {
            "gatewayClassName": "sim",
            "addresses": [{"type": "IPAddress", "value": "10.0.0.1"}],
            "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com",
                 "allowedRoutes": {"namespaces": {"from": "Same"}, "kinds": [{"kind": "HTTPRoute"}]}},
                {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "shop.example.com",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": "shop-cert"}]}}
            ]
        }
    })
}

fn gateway_class() -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "sim"},
           "spec": {"controllerName": "example.com/gateway-controller"}})
}

/// How much of the upstream CEL the interpreter handles: every rule must compile, and every rule
/// the realistic objects reach must run to a verdict (none skipped). Prints the counts.
#[test]
fn upstream_cel_rules_compile_and_run() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("upstream_cel_rules_compile_and_run")
    else {
        return;
    };
    let mut report = Vec::new();
    for (file, group, objects) in [
        (ROUTES, GATEWAY_GROUP, vec![http_route()]),
        (VIRTUAL_SERVICES, ISTIO_GROUP, vec![virtual_service()]),
        (DESTINATION_RULES, ISTIO_GROUP, vec![destination_rule()]),
        ("gateway-api-gateways.yaml", GATEWAY_GROUP, vec![gateway()]),
        (
            "gateway-api-gatewayclasses.yaml",
            GATEWAY_GROUP,
            vec![gateway_class()],
        ),
    ] {
        let schemas = served_schemas(file);
        let rules: Vec<_> = schemas.iter().flat_map(|(_, s)| cel_rules(s)).collect();
        let failed: Vec<_> = rules.iter().filter(|(_, _, r)| r.is_err()).collect();
        let distinct: BTreeSet<&str> = rules.iter().map(|(_, rule, _)| rule.as_str()).collect();
        let mut ran = BTreeSet::new();
        let mut skipped = Vec::new();
        for object in &objects {
            for (version, schema) in &schemas {
                let mut candidate = object.clone();
                candidate["apiVersion"] = json!(format!("{group}/{version}"));
                let stored = candidate.clone();
                // As a create, then as a no-op update so transition rules (oldSelf) run too.
                for old in [None, Some(&stored)] {
                    let (outcome, trace) = validate_and_prune_traced(schema, &mut candidate, old);
                    assert!(
                        outcome.errors.is_empty(),
                        "{file} {version}: {:#?}",
                        outcome.errors
                    );
                    ran.extend(trace.rules_run);
                    skipped.extend(trace.skipped);
                }
            }
        }
        report.push(format!(
            "{file}: {} rules ({} distinct), {} compile; {} distinct rules ran on the sample objects, {} skipped",
            rules.len(),
            distinct.len(),
            rules.len() - failed.len(),
            ran.len(),
            skipped.len()
        ));
        assert!(
            failed.is_empty(),
            "{file}: rules that do not compile: {failed:#?}"
        );
        assert!(
            skipped.is_empty(),
            "{file}: skipped at run time: {skipped:#?}"
        );
        assert!(!ran.is_empty(), "{file}: no rule ran");
    }
    println!("{}", report.join("\n"));
}

/// A hand-written schema exercising each keyword the validator implements.
fn keyword_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["name"],
                "x-kubernetes-validations": [
                    {"rule": "self.low <= self.high", "message": "low must be <= high", "fieldPath": ".low", "reason": "FieldValueForbidden"}
                ],
                "properties": {
                    "name": {"type": "string", "minLength": 2, "maxLength": 8, "pattern": "^[a-z]+$"},
                    "mode": {"type": "string", "enum": ["Fast", "Safe"], "default": "Safe"},
                    "low": {"type": "integer", "minimum": 0, "exclusiveMinimum": true},
                    "high": {"type": "number", "maximum": 10, "exclusiveMaximum": true, "multipleOf": 0.5},
                    "count": {"type": "integer", "format": "int32"},
                    "when": {"type": "string", "format": "date-time"},
                    "link": {"type": "string", "format": "uri"},
                    "maybe": {"type": "string", "nullable": true},
                    "port": {"x-kubernetes-int-or-string": true},
                    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3, "x-kubernetes-list-type": "set"},
                    "unique": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true},
                    "byKey": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                              "items": {"type": "object", "required": ["name"], "properties": {
                                  "name": {"type": "string"}, "size": {"type": "integer", "default": 1}}}},
                    "labels": {"type": "object", "minProperties": 1, "maxProperties": 2, "additionalProperties": {"type": "string", "maxLength": 3}},
                    "closed": {"type": "object", "additionalProperties": false},
                    "choice": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                               "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
                    "any": {"type": "string", "anyOf": [{"pattern": "^x"}, {"pattern": "y$"}], "allOf": [{"minLength": 2}], "not": {"enum": ["xy"]}},
                    "embedded": {"type": "object", "x-kubernetes-embedded-resource": true, "properties": {"spec": {"type": "object"}}},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                }
            }
        }
    })
}

fn valid_keyword_object() -> Value {
    json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {
            "name": "abc", "low": 1, "high": 9.5, "count": 5, "when": "2026-01-02T03:04:05Z",
            "link": "https://example.com", "maybe": null, "port": "http",
            "tags": ["a", "b"], "unique": [1, 2], "byKey": [{"name": "x"}, {"name": "y", "size": 2}],
            "labels": {"k": "v"}, "closed": {}, "choice": {"a": "1"}, "any": "xz",
            "embedded": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "spec": {}},
            "free": {"whatever": {"deep": [1]}}
        }
    })
}

#[test]
fn keyword_schema_accepts_valid_object_and_defaults() {
    let schema = keyword_schema();
    assert!(
        check_crd_schema(&schema).is_empty(),
        "{:#?}",
        check_crd_schema(&schema)
    );
    let mut object = valid_keyword_object();
    let outcome = validate_and_prune(&schema, &mut object, None);
    assert!(outcome.errors.is_empty(), "{:#?}", outcome.errors);
    assert!(
        outcome.pruned_fields.is_empty(),
        "{:?}",
        outcome.pruned_fields
    );
    assert_eq!(object["spec"]["mode"], "Safe");
    assert_eq!(object["spec"]["byKey"][0]["size"], 1);
    assert_eq!(object["spec"]["embedded"]["kind"], "ConfigMap");
}

#[test]
fn keyword_schema_rejects_each_violation() {
    let schema = keyword_schema();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("name", json!("Abc"), "spec.name", "FieldValueInvalid"),
        ("name", json!("a"), "spec.name", "FieldValueInvalid"),
        (
            "name",
            json!("abcdefghij"),
            "spec.name",
            "FieldValueTooLong",
        ),
        ("mode", json!("Slow"), "spec.mode", "FieldValueNotSupported"),
        ("low", json!(0), "spec.low", "FieldValueInvalid"),
        ("low", json!(1.5), "spec.low", "FieldValueTypeInvalid"),
        ("high", json!(10), "spec.high", "FieldValueInvalid"),
        ("high", json!(2.25), "spec.high", "FieldValueInvalid"),
        (
            "count",
            json!(3_000_000_000i64),
            "spec.count",
            "FieldValueInvalid",
        ),
        ("when", json!("yesterday"), "spec.when", "FieldValueInvalid"),
        ("link", json!("not a uri"), "spec.link", "FieldValueInvalid"),
        ("port", json!(true), "spec.port", "FieldValueTypeInvalid"),
        ("tags", json!([]), "spec.tags", "FieldValueInvalid"),
        (
            "tags",
            json!(["a", "b", "c", "d"]),
            "spec.tags",
            "FieldValueTooMany",
        ),
        (
            "tags",
            json!(["a", "a"]),
            "spec.tags[1]",
            "FieldValueDuplicate",
        ),
        (
            "unique",
            json!([1, 1]),
            "spec.unique[1]",
            "FieldValueDuplicate",
        ),
        (
            "byKey",
            json!([{"name": "x"}, {"name": "x"}]),
            "spec.byKey[1]",
            "FieldValueDuplicate",
        ),
        (
            "byKey",
            json!([{"size": 1}]),
            "spec.byKey[0].name",
            "FieldValueRequired",
        ),
        (
            "labels",
            json!({"k": "long"}),
            "spec.labels[k]",
            "FieldValueTooLong",
        ),
        ("labels", json!({}), "spec.labels", "FieldValueInvalid"),
        (
            "labels",
            json!({"a": "1", "b": "2", "c": "3"}),
            "spec.labels",
            "FieldValueTooMany",
        ),
        (
            "choice",
            json!({"a": "1", "b": "2"}),
            "spec.choice",
            "FieldValueInvalid",
        ),
        ("choice", json!({}), "spec.choice", "FieldValueInvalid"),
        ("any", json!("zz"), "spec.any", "FieldValueInvalid"),
        ("any", json!("xy"), "spec.any", "FieldValueInvalid"),
        ("any", json!("x"), "spec.any", "FieldValueInvalid"),
        ("maybe", json!(3), "spec.maybe", "FieldValueTypeInvalid"),
        (
            "unique",
            json!([1, "x"]),
            "spec.unique[1]",
            "FieldValueTypeInvalid",
        ),
        ("high", json!(0.5), "spec.low", "FieldValueForbidden"),
    ];
    for (field, value, path, reason) in cases {
        let mut object = valid_keyword_object();
        object["spec"][field] = value.clone();
        let outcome = validate_and_prune(&schema, &mut object, None);
        let found: Vec<(&str, &str)> = outcome
            .errors
            .iter()
            .map(|e| (e.path.as_str(), e.reason))
            .collect();
        assert_eq!(
            found,
            vec![(path, reason)],
            "{field} = {value}: {:#?}",
            outcome.errors
        );
    }

    // Required, pruning under additionalProperties: false, and nulls: a non-nullable null is
    // dropped, or defaulted when the field has a default; a nullable null stays.
    let mut object = valid_keyword_object();
    object["spec"].as_object_mut().map(|s| s.remove("name"));
    object["spec"]["closed"] = json!({"x": 1});
    object["spec"]["count"] = Value::Null;
    object["spec"]["mode"] = Value::Null;
    let outcome = validate_and_prune(&schema, &mut object, None);
    let found: Vec<(&str, &str)> = outcome
        .errors
        .iter()
        .map(|e| (e.path.as_str(), e.reason))
        .collect();
    assert_eq!(found, vec![("spec.name", "FieldValueRequired")]);
    assert_eq!(outcome.pruned_fields, vec!["spec.closed.x"]);
    assert!(object["spec"].get("count").is_none());
    assert_eq!(object["spec"]["mode"], "Safe");
    assert_eq!(object["spec"]["maybe"], Value::Null);

    // An embedded resource needs its type meta.
    let mut object = valid_keyword_object();
    object["spec"]["embedded"] = json!({"metadata": {"name": "c"}, "spec": {}});
    let outcome = validate_and_prune(&schema, &mut object, None);
    let found: Vec<(&str, &str)> = outcome
        .errors
        .iter()
        .map(|e| (e.path.as_str(), e.reason))
        .collect();
    assert_eq!(
        found,
        vec![
            ("spec.embedded.apiVersion", "FieldValueRequired"),
            ("spec.embedded.kind", "FieldValueRequired")
        ]
    );

    // A null list item is not dropped: it is a type error.
    let mut object = valid_keyword_object();
    object["spec"]["tags"] = json!(["a", null]);
    let outcome = validate_and_prune(&schema, &mut object, None);
    let found: Vec<(&str, &str)> = outcome
        .errors
        .iter()
        .map(|e| (e.path.as_str(), e.reason))
        .collect();
    assert_eq!(found, vec![("spec.tags[1]", "FieldValueTypeInvalid")]);
}
