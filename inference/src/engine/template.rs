//! Chat templates rendered the way transformers' `apply_chat_template` renders them.
//!
//! transformers runs Jinja2 with `trim_blocks` and `lstrip_blocks`, lenient undefined values, its own
//! `tojson` (no HTML escaping, Python `json.dumps` spacing, `indent`/`ensure_ascii` options) and a
//! `raise_exception` global. Templates also call Python methods (`str.split`, `dict.get`...), which
//! minijinja provides through `minijinja_contrib::pycompat`.
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, UndefinedBehavior};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid chat template: {0}")]
    Compile(String),
    /// Includes `raise_exception` calls: templates use them to reject message sequences
    /// (e.g. roles not alternating), which is the client's error.
    #[error("chat template error: {0}")]
    Render(String),
}

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// Render `messages` (OpenAI-style objects: `role`, `content`, optional `tool_calls`...) into the
    /// prompt text. `tools` is passed through for templates that describe tools.
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            tools => tools.map(|t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template
            .render(ctx)
            .map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// minijinja's Display omits the cause chain; `raise_exception` messages live there.
fn describe(e: &JinjaError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)` with Python's separators
/// (`", "` and `": "` without indent, `","` and `": "` with it) and no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let opts = JsonOpts {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(out: &mut String, v: &Value, o: &JsonOpts, depth: usize) -> Result<(), JinjaError> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, v),
        ValueKind::String => write_str(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, o, depth, '[', ']', &items, |out, item| {
                write_json(out, item, o, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            write_container(out, o, depth, '{', '}', &keys, |out, key| {
                write_str(out, &key_text(key), o.ensure_ascii);
                out.push_str(": ");
                write_json(out, &v.get_item(key)?, o, depth + 1)
            })?;
        }
        _ => write_str(out, &v.to_string(), o.ensure_ascii),
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    o: &JsonOpts,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), JinjaError>,
) -> Result<(), JinjaError> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        match &o.indent {
            Some(ind) => {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&ind.repeat(depth + 1));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        write_item(out, item)?;
    }
    if let Some(ind) = &o.indent {
        out.push('\n');
        out.push_str(&ind.repeat(depth));
    }
    out.push(close);
    Ok(())
}

fn key_text(key: &Value) -> String {
    match key.as_str() {
        Some(s) => s.to_owned(),
        None => key.to_string(),
    }
}

/// Python prints integral floats with a trailing `.0`.
fn write_number(out: &mut String, v: &Value) {
    if v.is_integer() {
        out.push_str(&v.to_string());
        return;
    }
    match f64::try_from(v.clone()) {
        Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
            out.push_str(&format!("{f:.1}"))
        }
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
        Ok(f) => out.push_str(&f.to_string()),
        Err(_) => out.push_str(&v.to_string()),
    }
}

fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>"))?;
        let msgs = messages.as_array().cloned().unwrap_or_default();
        t.render(&msgs, None, true)
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[1] | tojson(ensure_ascii=True) }}";
        let out = render(src, json!([{"a": [1, 2.0, "x<y"], "b": null}, "é\n"])).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.0, \"x<y\"], \"b\": null}|{\n  \"a\": [\n    1,\n    2.0,\n    \"x<y\"\n  ],\n  \"b\": null\n}|\"\\u00e9\\n\""
        );
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn python_methods_and_lenient_undefined() {
        let src = "{{ messages[0].content.split('</think>')[-1].strip() }}{{ messages[0].get('x', 'd') }}{{ messages[0].nope }}{{ bos_token }}";
        let out = render(
            src,
            json!([{"role": "assistant", "content": "a</think> b "}]),
        )
        .unwrap();
        assert_eq!(out, "bd<s>");
    }
}
