//! Request fields both protocols read the same way (protocol v1's `infer`
//! and the OpenAI API's bodies): token biases, the one constraint a request
//! may have, a JSON schema, priority and deadline. Sans-I/O.

use serde_json::Value;

use crate::core::{Constraint, MAX_DEADLINE_MS, Urgency};

/// `{"token id": bias}` (OpenAI's form) or `[[id, bias], ...]` (llama-server's).
pub fn parse_logit_bias(value: &Value) -> Result<Vec<(i32, f32)>, String> {
    const SHAPE: &str = "must map token ids to biases: {\"42\": -100} or [[42, -100]]";
    let pair = |id: Option<i32>, bias: Option<f64>| match (id, bias) {
        (Some(id), Some(bias)) => Ok((id, bias as f32)),
        _ => Err(SHAPE.to_owned()),
    };
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| pair(k.parse().ok(), v.as_f64()))
            .collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([id, bias]) => pair(
                    id.as_i64().and_then(|i| i32::try_from(i).ok()),
                    bias.as_f64(),
                ),
                _ => Err(SHAPE.to_owned()),
            })
            .collect(),
        _ => Err(SHAPE.to_owned()),
    }
}

/// At most one constraint of the request's fields, named `field` for errors.
pub fn one_constraint(
    fields: [(&str, Option<Constraint>); 4],
) -> Result<Option<Constraint>, String> {
    let mut given = fields.into_iter().filter_map(|(n, c)| c.map(|c| (n, c)));
    match (given.next(), given.next()) {
        (Some((a, _)), Some((b, _))) => Err(format!(
            "{a} and {b} are both constraints on the output: give one"
        )),
        (first, None) => Ok(first.map(|(_, c)| c)),
        (None, Some(_)) => unreachable!("the second comes after the first"),
    }
}

/// A JSON schema is an object or a boolean.
pub fn json_schema(field: &str, schema: Value) -> Result<Constraint, String> {
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(Constraint::JsonSchema(schema)),
        _ => Err(format!("{field} must be a JSON schema (an object)")),
    }
}

/// `priority` and `deadline_ms` (1 ms to a day), as both protocols take them.
pub fn urgency(priority: Option<i32>, deadline_ms: Option<u64>) -> Result<Urgency, String> {
    let deadline = match deadline_ms {
        None => None,
        Some(ms @ 1..=MAX_DEADLINE_MS) => Some(std::time::Duration::from_millis(ms)),
        Some(ms) => {
            return Err(format!(
                "deadline_ms = {ms} is out of range: 1 to {MAX_DEADLINE_MS} (a day)"
            ));
        }
    };
    Ok(Urgency {
        priority: priority.unwrap_or(0),
        deadline,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn biases_in_either_form_and_bad_shapes_refused() {
        assert_eq!(
            parse_logit_bias(&json!({"42": -100, "7": 1.5}))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            parse_logit_bias(&json!([[42, -100]])).unwrap(),
            vec![(42, -100.0)]
        );
        for bad in [json!({"x": 1}), json!([[1]]), json!([["1", 2]]), json!(3)] {
            assert!(parse_logit_bias(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_constraint_at_most_and_schemas_are_objects() {
        let regex = || Some(Constraint::Regex("a".into()));
        assert_eq!(
            one_constraint([("a", None), ("b", regex()), ("c", None), ("d", None)]),
            Ok(regex())
        );
        let e =
            one_constraint([("a", regex()), ("b", None), ("c", regex()), ("d", None)]).unwrap_err();
        assert!(e.starts_with("a and c are both constraints"), "{e}");
        assert!(json_schema("f", json!("x")).is_err());
        assert!(json_schema("f", json!(true)).is_ok());
        assert_eq!(urgency(None, None), Ok(Urgency::default()));
        assert!(urgency(Some(1), Some(MAX_DEADLINE_MS + 1)).is_err());
    }
}
