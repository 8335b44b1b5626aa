//! Hugging Face chat templates (Jinja) rendered with minijinja, in the environment that
//! `transformers` gives them: trim_blocks, lstrip_blocks, loop controls, Python string methods,
//! `raise_exception`, `strftime_now` and a Python-compatible `tojson`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Error)]
pub enum ChatTemplateError {
    #[error("invalid chat template: {0}")]
    Syntax(#[source] Error),
    #[error("cannot render chat template: {0}")]
    Render(#[source] Error),
}

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`, so syntax errors surface when the model loads, not per request.
    pub fn new(source: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self { env })
    }

    /// Renders the prompt. A missing special token is left undefined (renders as nothing),
    /// as `transformers` does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String, ChatTemplateError> {
        let mut ctx = BTreeMap::from([
            (
                "messages",
                messages
                    .iter()
                    .map(|m| Value::from_object(MessageValue(m.clone())))
                    .collect(),
            ),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            // transformers passes these as None when the request has none.
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ]);
        if let Some(bos) = bos_token {
            ctx.insert("bos_token", Value::from(bos));
        }
        if let Some(eos) = eos_token {
            ctx.insert("eos_token", Value::from(eos));
        }
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(ctx))
            .map_err(ChatTemplateError::Render)
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<String, Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, now).map_err(|message| Error::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, as templates written for
/// transformers expect: Python's separators, keys in insertion order, and no HTML escaping
/// (unlike minijinja's own `tojson`).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut writer = JsonWriter {
        out: String::new(),
        indent,
    };
    writer.value(&value, 0)?;
    Ok(Value::from_safe_string(writer.out))
}

struct JsonWriter {
    out: String,
    indent: Option<usize>,
}

impl JsonWriter {
    fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => self.out.push_str(&value.to_string()),
            ValueKind::Number => {
                let float = f64::try_from(value.clone())?;
                self.out
                    .push_str(&serde_json::to_string(&float).expect("f64 serializes"));
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container('[', ']', depth, &items, |w, item| w.value(item, depth + 1))?;
            }
            ValueKind::Map => {
                let keys: Vec<Value> = value.try_iter()?.collect();
                self.container('{', '}', depth, &keys, |w, key| {
                    w.string(&key.as_str().map_or_else(|| key.to_string(), str::to_string));
                    w.out.push_str(": ");
                    w.value(&value.get_item(key)?, depth + 1)
                })?;
            }
            _ => self.string(&value.to_string()),
        }
        Ok(())
    }

    fn string(&mut self, s: &str) {
        self.out
            .push_str(&serde_json::to_string(s).expect("strings serialize"));
    }

    fn container(
        &mut self,
        open: char,
        close: char,
        depth: usize,
        items: &[Value],
        mut write: impl FnMut(&mut Self, &Value) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out
                    .push_str(if self.indent.is_some() { "," } else { ", " });
            }
            self.newline(depth + 1);
            write(self, item)?;
        }
        if !items.is_empty() {
            self.newline(depth);
        }
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(width) = self.indent {
            self.out.push('\n');
            self.out.extend(std::iter::repeat_n(' ', width * depth));
        }
    }
}

/// A message as the template sees it: a map with `role` then `content`, in that order.
#[derive(Debug)]
struct MessageValue(ChatMessage);

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// C `strftime` for the UTC time `unix_secs`, limited to the directives chat templates use.
fn strftime(format: &str, unix_secs: i64) -> Result<String, String> {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize];
    let month_name = MONTHS[month as usize - 1];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let directive = chars.next().ok_or("strftime format ends with a lone '%'")?;
        let piece = match directive {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'j' => format!("{day_of_year:03}"),
            'B' => month_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'A' => weekday.to_string(),
            'a' => weekday[..3].to_string(),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            '%' => "%".to_string(),
            other => return Err(format!("unsupported strftime directive %{other}")),
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_model::LLAMA3_CHAT_TEMPLATE as LLAMA3;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect()
    }

    /// meta-llama/Llama-3.2-1B-Instruct (tool-calling branches included; they must compile).
    const LLAMA32: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    /// Qwen/Qwen2-7B-Instruct (ChatML).
    const QWEN2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Qwen/Qwen2.5-7B-Instruct, without the tool-call branches of assistant messages.
    const QWEN25: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// mistralai/Mistral-7B-Instruct-v0.1.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn renders_llama3() {
        let t = ChatTemplate::new(LLAMA3).unwrap();
        let m = msgs(&[("system", "You are terse. "), ("user", "  What is 2+2?\n")]);
        let out = t
            .render(&m, true, Some("<|begin_of_text|>"), Some("<|eot_id|>"))
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let no_prompt = t
            .render(&m, false, Some("<|begin_of_text|>"), None)
            .unwrap();
        assert!(no_prompt.ends_with("What is 2+2?<|eot_id|>"));
    }

    #[test]
    fn renders_llama32_with_todays_date() {
        let t = ChatTemplate::new(LLAMA32).unwrap();
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
        ]);
        let out = t
            .render(&m, true, Some("<|begin_of_text|>"), Some("<|eot_id|>"))
            .unwrap();
        let today = strftime_now("%d %b %Y".into()).unwrap();
        assert_eq!(
            out,
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                 Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n\
                 Be brief.<|eot_id|>\
                 <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
                 <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        );
    }

    #[test]
    fn renders_chatml_of_qwen2_and_qwen25() {
        let t = ChatTemplate::new(QWEN2).unwrap();
        let out = t
            .render(&msgs(&[("user", "Hi")]), true, None, Some("<|im_end|>"))
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );

        let t = ChatTemplate::new(QWEN25).unwrap();
        let m = msgs(&[
            ("system", "Answer in French."),
            ("user", "Hello"),
            ("assistant", "Bonjour"),
            ("user", "Thanks"),
        ]);
        let out = t.render(&m, true, None, Some("<|im_end|>")).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nAnswer in French.<|im_end|>\n\
             <|im_start|>user\nHello<|im_end|>\n\
             <|im_start|>assistant\nBonjour<|im_end|>\n\
             <|im_start|>user\nThanks<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_reaches_the_caller() {
        let t = ChatTemplate::new(MISTRAL).unwrap();
        let ok = t
            .render(
                &msgs(&[("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]),
                false,
                Some("<s>"),
                Some("</s>"),
            )
            .unwrap();
        assert_eq!(ok, "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]");
        let err = t
            .render(
                &msgs(&[("user", "Hi"), ("user", "Again")]),
                false,
                Some("<s>"),
                Some("</s>"),
            )
            .unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)));
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn python_methods_and_block_trimming() {
        let src = "{% for m in messages %}\n  {% if m.content.strip().startswith('/') %}\n[cmd:{{ m.content.strip()[1:].upper() }}]\n  {% else %}\n{{ m.content.split(' ') | join('|') }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        let out = t
            .render(
                &msgs(&[("user", "  /help "), ("user", "a b c")]),
                false,
                None,
                None,
            )
            .unwrap();
        assert_eq!(out, "[cmd:HELP]\na|b|c\n");
        // An undefined special token renders as nothing, as in transformers.
        let t = ChatTemplate::new("[{{ bos_token }}]").unwrap();
        assert_eq!(t.render(&[], false, None, None).unwrap(), "[]");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ [1, 'é<'] | tojson(indent=2) }}")
            .unwrap();
        let out = t
            .render(&msgs(&[("user", "a \"q\" <b>")]), false, None, None)
            .unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"a \\\"q\\\" <b>\"}|[\n  1,\n  \"é<\"\n]"
        );
    }

    #[test]
    fn syntax_errors_fail_at_load() {
        let err = ChatTemplate::new("{% for m in messages %}").unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)));
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 15:05:09 UTC, a Friday.
        let t = 1_722_006_000 + 309;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %I%p %y %j %%", t).unwrap(),
            "Friday July 26 15:05:09 03PM 24 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0).unwrap(), "1970-01-01 Thu");
        assert_eq!(
            strftime("%Y-%m-%d %j", 951_782_400).unwrap(),
            "2000-02-29 060"
        );
        assert_eq!(strftime("%Y-%m-%d", -86_400).unwrap(), "1969-12-31");
        assert!(strftime("%Q", 0).is_err());
    }
}
