//! The declarative dialect: a login request and an optional refresh request described in config
//! (method, URL, parameters by location, templated values — see [`super::template`]) and their
//! answers read through JSON pointers.
//!
//! ```toml
//! [credentials.api]
//! dialect = "custom"
//! secrets = { password = { env = "API_PASSWORD" } }
//! refresh_token = { file = "/run/secrets/bootstrap" }   # optional bootstrap refresh token
//!
//! [credentials.api.login]
//! method = "POST"                       # default POST
//! url = "https://api.example/session"
//! json = { email = "me@example.com", password = "{secret.password}" }
//! # typed values: at = { number = "{now_ms}" }, on = { bool = "true" }; { object = {…} } escapes
//! # also: query = {…}, form = {…}, headers = {…}
//! [credentials.api.login.response]
//! access_token = "/data/token/access_token"    # JSON pointers
//! expires = "/data/token/access_expires"
//! expires_format = "rfc3339"   # relative_seconds | epoch_seconds | epoch_millis | rfc3339 | jwt
//! refresh_token = "/data/token/refresh_token"
//! success = { pointer = "/code", equals = 0 }  # and/or: status = [200] (default: any 2xx)
//! error_code = "/code"
//! relogin_codes = [40020]      # the refresh token is dead: log in again
//! fatal_codes = [40080]        # never retried
//! transient_codes = []         # retried with back-off
//! other_errors = "fatal"       # default: fatal on a login, relogin on a refresh
//! ```
//!
//! A refresh request that uses `{refresh_token}` runs while a refresh token is held; one that
//! uses only `{access_token}` (providers that refresh with the access token) runs while an access
//! token is held and falls back to the login at once when refused.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use super::http::ProviderResponse;
use super::template::{Context, Template};
use super::vendor::{self, ExpiresFormat};
use super::{
    Dialect, DialectError, ErrorClass, Grant, GrantKind, Held, ProviderClient, parse_keys,
};
use crate::secret::{Secret, SecretSource};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    #[serde(default)]
    secrets: BTreeMap<String, SecretSource>,
    refresh_token: Option<SecretSource>,
    login: Option<RequestKeys>,
    refresh: Option<RequestKeys>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestKeys {
    #[serde(default = "default_method")]
    method: String,
    url: String,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default)]
    form: BTreeMap<String, String>,
    json: Option<Value>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    response: ResponseKeys,
}

fn default_method() -> String {
    "POST".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseKeys {
    access_token: String,
    expires: Option<String>,
    expires_format: Option<ExpiresFormat>,
    refresh_token: Option<String>,
    refresh_expires: Option<String>,
    refresh_expires_format: Option<ExpiresFormat>,
    success: Option<SuccessKeys>,
    status: Option<Vec<u16>>,
    error_code: Option<String>,
    #[serde(default)]
    relogin_codes: Vec<Value>,
    #[serde(default)]
    fatal_codes: Vec<Value>,
    #[serde(default)]
    transient_codes: Vec<Value>,
    other_errors: Option<OtherErrors>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuccessKeys {
    pointer: String,
    equals: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OtherErrors {
    Fatal,
    Relogin,
    Transient,
}

/// A JSON body template: strings are templates; a table whose only key is `number` or `bool`
/// is a template whose rendering is sent as that JSON type; `{ object = {…} }` is a table sent
/// as an object (for an object whose one key is `number`, `bool` or `object`); everything else is
/// sent as written.
#[derive(Debug)]
enum JsonTemplate {
    Str(Template),
    Typed(JsonType, Template),
    Lit(Value),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum JsonType {
    Number,
    Bool,
}

impl JsonType {
    fn name(self) -> &'static str {
        match self {
            JsonType::Number => "number",
            JsonType::Bool => "bool",
        }
    }

    /// The rendered text as this type. The error never quotes the text: it may hold a secret.
    fn value(self, text: &str) -> Result<Value, String> {
        match self {
            JsonType::Bool => match text {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => Err("renders to text that is not a JSON boolean (`true` or `false`)".into()),
            },
            JsonType::Number => {
                let bad = || "renders to text that is not a JSON number".to_string();
                // serde_json skips surrounding whitespace; a JSON number has none.
                if text.trim() != text {
                    return Err(bad());
                }
                let n: serde_json::Number = serde_json::from_str(text).map_err(|_| bad())?;
                // Without a fraction or exponent it must stay an exact integer, not a rounded float.
                if !text.contains(['.', 'e', 'E']) && !(n.is_i64() || n.is_u64()) {
                    return Err("renders to an integer beyond 64 bits".into());
                }
                Ok(Value::Number(n))
            }
        }
    }
}

impl JsonTemplate {
    /// The body as written (templates unrendered), for the chain identity.
    fn source(&self) -> String {
        match self {
            JsonTemplate::Str(t) => format!("{:?}", t.source()),
            JsonTemplate::Typed(ty, t) => format!("{}({:?})", ty.name(), t.source()),
            JsonTemplate::Lit(v) => v.to_string(),
            JsonTemplate::Array(items) => format!(
                "[{}]",
                items.iter().map(Self::source).collect::<Vec<_>>().join(",")
            ),
            JsonTemplate::Object(fields) => format!(
                "{{{}}}",
                fields
                    .iter()
                    .map(|(k, v)| format!("{k:?}:{}", v.source()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    fn parse(v: &Value, key: &str, errors: &mut Vec<(String, String)>) -> JsonTemplate {
        match v {
            Value::String(s) => match Template::parse(s) {
                Ok(t) => JsonTemplate::Str(t),
                Err(e) => {
                    errors.push((key.into(), e));
                    JsonTemplate::Lit(Value::Null)
                }
            },
            Value::Array(items) => JsonTemplate::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| JsonTemplate::parse(v, &format!("{key}[{i}]"), errors))
                    .collect(),
            ),
            Value::Object(map) if map.len() == 1 => {
                let (name, inner) = map.iter().next().expect("one entry");
                let ty = match name.as_str() {
                    "number" => JsonType::Number,
                    "bool" => JsonType::Bool,
                    "object" => {
                        return match inner {
                            Value::Object(map) => JsonTemplate::object(map, key, errors),
                            _ => {
                                errors.push((
                                    key.into(),
                                    "`{ object = … }` takes a table, sent as a JSON object".into(),
                                ));
                                JsonTemplate::Lit(Value::Null)
                            }
                        };
                    }
                    _ => return JsonTemplate::object(map, key, errors),
                };
                JsonTemplate::typed(ty, inner, key, errors)
            }
            Value::Object(map) => JsonTemplate::object(map, key, errors),
            other => JsonTemplate::Lit(other.clone()),
        }
    }

    fn object(
        map: &serde_json::Map<String, Value>,
        key: &str,
        errors: &mut Vec<(String, String)>,
    ) -> JsonTemplate {
        JsonTemplate::Object(
            map.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        JsonTemplate::parse(v, &format!("{key}.{k}"), errors),
                    )
                })
                .collect(),
        )
    }

    /// `{ number = "…" }` or `{ bool = "…" }`. A template that depends on nothing but the
    /// clock renders the same way at every call, so it is checked now rather than at the login.
    fn typed(
        ty: JsonType,
        inner: &Value,
        key: &str,
        errors: &mut Vec<(String, String)>,
    ) -> JsonTemplate {
        let name = ty.name();
        let Value::String(src) = inner else {
            errors.push((
                key.into(),
                format!("`{{ {name} = … }}` takes a template string such as \"{{now_ms}}\" (write a constant without the table)"),
            ));
            return JsonTemplate::Lit(Value::Null);
        };
        let t = match Template::parse(src) {
            Ok(t) => t,
            Err(e) => {
                errors.push((key.into(), e));
                return JsonTemplate::Lit(Value::Null);
            }
        };
        if t.depends_only_on_the_clock() {
            let secrets = BTreeMap::new();
            let ctx = Context {
                secrets: &secrets,
                refresh_token: None,
                access_token: None,
                now_ms: vendor::now_ms(),
                nonce: "",
            };
            let checked = t
                .render(&ctx)
                .and_then(|text| ty.value(text.expose()).map(|_| ()));
            if let Err(e) = checked {
                errors.push((key.into(), format!("`{{ {name} = … }}` {e}")));
            }
        }
        JsonTemplate::Typed(ty, t)
    }

    fn templates<'a>(&'a self, out: &mut Vec<&'a Template>) {
        match self {
            JsonTemplate::Str(t) | JsonTemplate::Typed(_, t) => out.push(t),
            JsonTemplate::Lit(_) => {}
            JsonTemplate::Array(items) => items.iter().for_each(|i| i.templates(out)),
            JsonTemplate::Object(items) => items.iter().for_each(|(_, i)| i.templates(out)),
        }
    }

    fn render(&self, ctx: &Context<'_>, key: &str) -> Result<Value, DialectError> {
        Ok(match self {
            JsonTemplate::Str(t) => Value::String(
                t.render(ctx)
                    .map_err(|e| render_error(key, e))?
                    .expose()
                    .to_string(),
            ),
            JsonTemplate::Typed(ty, t) => {
                let text = t.render(ctx).map_err(|e| render_error(key, e))?;
                ty.value(text.expose())
                    .map_err(|e| render_error(key, format!("`{{ {} = … }}` {e}", ty.name())))?
            }
            JsonTemplate::Lit(v) => v.clone(),
            JsonTemplate::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| item.render(ctx, &format!("{key}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            JsonTemplate::Object(items) => {
                let mut map = serde_json::Map::new();
                for (k, v) in items {
                    map.insert(k.clone(), v.render(ctx, &format!("{key}.{k}"))?);
                }
                Value::Object(map)
            }
        })
    }
}

fn render_error(key: &str, reason: String) -> DialectError {
    DialectError::fatal(format!("`{key}`: {reason}"))
}

struct Response {
    access_token: String,
    expires: Option<(String, ExpiresFormat)>,
    refresh_token: Option<String>,
    refresh_expires: Option<(String, ExpiresFormat)>,
    success: Option<(String, Value)>,
    status: Option<Vec<u16>>,
    error_code: Option<String>,
    relogin: Vec<String>,
    fatal: Vec<String>,
    transient: Vec<String>,
    other: OtherErrors,
}

struct Request {
    /// `login` or `refresh`, for messages.
    name: &'static str,
    method: reqwest::Method,
    url: Template,
    query: Vec<(String, Template)>,
    form: Vec<(String, Template)>,
    json: Option<JsonTemplate>,
    headers: Vec<(http::HeaderName, Template)>,
    response: Response,
}

pub struct Custom {
    secrets: BTreeMap<String, SecretSource>,
    bootstrap: Option<SecretSource>,
    login: Option<Request>,
    refresh: Option<Request>,
    /// The refresh request runs with the access token (no refresh token exists).
    refresh_with_access_token: bool,
}

fn code_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn check_pointer(key: &str, p: &str, errors: &mut Vec<(String, String)>) {
    if !p.starts_with('/') {
        errors.push((
            key.into(),
            "must be a JSON pointer starting with '/' (e.g. \"/data/access_token\")".into(),
        ));
    }
}

impl Request {
    fn parse(
        name: &'static str,
        k: RequestKeys,
        secrets: &BTreeMap<String, SecretSource>,
        errors: &mut Vec<(String, String)>,
    ) -> Option<Request> {
        let before = errors.len();
        let method = match reqwest::Method::from_bytes(k.method.to_ascii_uppercase().as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                errors.push((format!("{name}.method"), "is not an HTTP method".into()));
                reqwest::Method::POST
            }
        };
        fn template(
            errors: &mut Vec<(String, String)>,
            key: String,
            src: &str,
        ) -> Option<Template> {
            match Template::parse(src) {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.push((key, e));
                    None
                }
            }
        }
        let url = template(errors, format!("{name}.url"), &k.url);
        let query: Vec<_> = k
            .query
            .iter()
            .filter_map(|(q, v)| {
                Some((q.clone(), template(errors, format!("{name}.query.{q}"), v)?))
            })
            .collect();
        let form: Vec<_> = k
            .form
            .iter()
            .filter_map(|(f, v)| {
                Some((f.clone(), template(errors, format!("{name}.form.{f}"), v)?))
            })
            .collect();
        let mut headers = Vec::new();
        for (h, v) in &k.headers {
            let t = template(errors, format!("{name}.headers.{h}"), v);
            match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => {
                    if let Some(t) = t {
                        headers.push((n, t));
                    }
                }
                Err(_) => errors.push((
                    format!("{name}.headers.{h}"),
                    "is not a valid header name".into(),
                )),
            }
        }
        let json = k
            .json
            .as_ref()
            .map(|v| JsonTemplate::parse(v, &format!("{name}.json"), errors));
        if json.is_some() && !form.is_empty() {
            errors.push((
                format!("{name}.json"),
                "a request has a JSON body or a form body, not both".into(),
            ));
        }
        if let Some(url) = &url {
            let src = url.source();
            let ok = if url.is_literal() {
                super::is_http_url(src)
            } else {
                src.starts_with("http://") || src.starts_with("https://")
            };
            if !ok {
                errors.push((format!("{name}.url"), "must be an http or https URL".into()));
            }
        }
        // Every secret a template names must be configured.
        let mut all: Vec<&Template> = url.iter().collect();
        all.extend(query.iter().map(|(_, t)| t));
        all.extend(form.iter().map(|(_, t)| t));
        all.extend(headers.iter().map(|(_, t)| t));
        if let Some(j) = &json {
            j.templates(&mut all);
        }
        for t in &all {
            for s in t.secret_names() {
                if !secrets.contains_key(&s) {
                    errors.push((
                        name.to_string(),
                        format!("uses secret.{s}, which is not in `secrets`"),
                    ));
                }
            }
            if name == "login" && (t.uses_refresh_token() || t.uses_access_token()) {
                errors.push((
                    "login".into(),
                    "a login cannot use {refresh_token} or {access_token} (it runs when none is held)".into(),
                ));
            }
        }
        let r = k.response;
        let rk = |s: &str| format!("{name}.response.{s}");
        check_pointer(&rk("access_token"), &r.access_token, errors);
        for (key, p) in [
            ("expires", &r.expires),
            ("refresh_token", &r.refresh_token),
            ("refresh_expires", &r.refresh_expires),
            ("error_code", &r.error_code),
        ] {
            if let Some(p) = p {
                check_pointer(&rk(key), p, errors);
            }
        }
        if let Some(s) = &r.success {
            check_pointer(&rk("success.pointer"), &s.pointer, errors);
        }
        if let Some(codes) = &r.status {
            if codes.is_empty() || codes.iter().any(|c| !(100..=599).contains(c)) {
                errors.push((rk("status"), "must list HTTP status codes (100–599)".into()));
            }
        }
        let mut codes = |key: &str, list: &[Value]| -> Vec<String> {
            let mut out = Vec::new();
            for v in list {
                match code_text(v) {
                    Some(c) => out.push(c),
                    None => errors.push((rk(key), "lists numbers or strings only".into())),
                }
            }
            out
        };
        let relogin = codes("relogin_codes", &r.relogin_codes);
        let fatal = codes("fatal_codes", &r.fatal_codes);
        let transient = codes("transient_codes", &r.transient_codes);
        if (!relogin.is_empty() || !fatal.is_empty() || !transient.is_empty())
            && r.error_code.is_none()
        {
            errors.push((rk("error_code"), "is needed to match the *_codes lists (a JSON pointer to the provider's error code)".into()));
        }
        let expires_format = r.expires_format.unwrap_or(ExpiresFormat::RelativeSeconds);
        if r.expires.is_none() && r.expires_format.is_some() && expires_format != ExpiresFormat::Jwt
        {
            errors.push((
                rk("expires"),
                "is needed with expires_format (or use expires_format = \"jwt\")".into(),
            ));
        }
        if errors.len() != before {
            return None;
        }
        Some(Request {
            name,
            method,
            url: url?,
            query,
            form,
            json,
            headers,
            response: Response {
                access_token: r.access_token,
                expires: r.expires.map(|p| (p, expires_format)),
                refresh_token: r.refresh_token,
                refresh_expires: r
                    .refresh_expires
                    .map(|p| (p, r.refresh_expires_format.unwrap_or(expires_format))),
                success: r.success.map(|s| (s.pointer, s.equals)),
                status: r.status,
                error_code: r.error_code,
                relogin,
                fatal,
                transient,
                other: r.other_errors.unwrap_or(if name == "login" {
                    OtherErrors::Fatal
                } else {
                    OtherErrors::Relogin
                }),
            },
        })
    }

    fn templates(&self) -> Vec<&Template> {
        let mut all: Vec<&Template> = vec![&self.url];
        all.extend(self.query.iter().map(|(_, t)| t));
        all.extend(self.form.iter().map(|(_, t)| t));
        all.extend(self.headers.iter().map(|(_, t)| t));
        if let Some(j) = &self.json {
            j.templates(&mut all);
        }
        all
    }

    fn uses(&self, f: impl Fn(&Template) -> bool) -> bool {
        self.templates().into_iter().any(f)
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.url.source())
    }

    /// Everything the request sends, as written: a login's inputs name the account (a user
    /// name written in the form, or the secret it is read from).
    fn inputs(&self) -> String {
        let pairs = |list: &[(String, Template)]| {
            list.iter()
                .map(|(k, t)| format!("{k}={:?}", t.source()))
                .collect::<Vec<_>>()
                .join("&")
        };
        let headers = self
            .headers
            .iter()
            .map(|(h, t)| format!("{h}: {:?}", t.source()))
            .collect::<Vec<_>>()
            .join("; ");
        format!(
            "{} query [{}] form [{}] json [{}] headers [{}]",
            self.describe(),
            pairs(&self.query),
            pairs(&self.form),
            self.json
                .as_ref()
                .map(JsonTemplate::source)
                .unwrap_or_default(),
            headers
        )
    }

    fn build(
        &self,
        client: &ProviderClient,
        ctx: &Context<'_>,
    ) -> Result<reqwest::RequestBuilder, DialectError> {
        let name = self.name;
        let render = |key: String, t: &Template| t.render(ctx).map_err(|e| render_error(&key, e));
        let url = render(format!("{name}.url"), &self.url)?;
        if url::Url::parse(url.expose()).is_err() {
            return Err(DialectError::fatal(format!(
                "`{name}.url` does not render to a valid URL"
            )));
        }
        let mut request = client
            .request(self.method.clone(), url.expose())
            .header(reqwest::header::ACCEPT, "application/json");
        if !self.query.is_empty() {
            let mut pairs = Vec::new();
            for (k, t) in &self.query {
                pairs.push((k.as_str(), render(format!("{name}.query.{k}"), t)?));
            }
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.expose())).collect();
            request = request.query(&pairs);
        }
        for (h, t) in &self.headers {
            let v = render(format!("{name}.headers.{h}"), t)?;
            let mut value = http::HeaderValue::from_str(v.expose()).map_err(|_| {
                DialectError::fatal(format!(
                    "`{name}.headers.{h}` renders to a value that cannot be sent in a header"
                ))
            })?;
            value.set_sensitive(true);
            request = request.header(h.clone(), value);
        }
        if let Some(json) = &self.json {
            let body = Secret::new(json.render(ctx, &format!("{name}.json"))?.to_string());
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.expose().to_string());
        } else if !self.form.is_empty() {
            let mut pairs = Vec::new();
            for (k, t) in &self.form {
                pairs.push((k.as_str(), render(format!("{name}.form.{k}"), t)?));
            }
            let body = Secret::new(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.expose())))
                    .finish(),
            );
            request = request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body.expose().to_string());
        }
        Ok(request)
    }

    /// Reads the answer: success by status and pointer equality, errors by the code lists.
    fn read(&self, response: &ProviderResponse, kind: GrantKind) -> Result<Grant, DialectError> {
        let r = &self.response;
        let status = response.status;
        if let Some(e) = vendor::transient_status(response) {
            if !r.status.as_ref().is_some_and(|s| s.contains(&status)) {
                return Err(e);
            }
        }
        let status_ok = match &r.status {
            Some(list) => list.contains(&status),
            None => (200..300).contains(&status),
        };
        let body = match vendor::json_object(response) {
            Ok(b) => Some(b),
            Err(e) if status_ok => return Err(e),
            Err(_) => None,
        };
        let success = status_ok
            && match (&r.success, &body) {
                (Some((pointer, want)), Some(b)) => b
                    .pointer(pointer)
                    .is_some_and(|v| vendor::json_equal(v, want)),
                _ => true,
            };
        if success {
            if let Some(body) = &body {
                return self.parse_grant(body, kind);
            }
        }
        let code = match (&r.error_code, &body) {
            (Some(p), Some(b)) => vendor::code_at(b, p),
            _ => None,
        };
        let what = match &code {
            Some(c) => format!("{} answered HTTP {status} with error code {c}", self.name),
            None => format!("{} answered HTTP {status} without success", self.name),
        };
        let class = match &code {
            Some(c) if r.fatal.contains(c) => OtherErrors::Fatal,
            Some(c) if r.relogin.contains(c) => OtherErrors::Relogin,
            Some(c) if r.transient.contains(c) => OtherErrors::Transient,
            _ => r.other,
        };
        Err(match (class, kind) {
            (OtherErrors::Transient, _) => DialectError {
                class: ErrorClass::Transient {
                    retry_after: response.retry_after,
                },
                message: what,
            },
            (OtherErrors::Relogin, GrantKind::Refresh) => {
                DialectError::relogin(format!("{what}: the refresh is refused; logging in again"))
            }
            _ => DialectError::fatal(format!("{what}; not retrying")),
        })
    }

    fn parse_grant(&self, body: &Value, kind: GrantKind) -> Result<Grant, DialectError> {
        let r = &self.response;
        let what = |p: &str| format!("{}{p}", self.name);
        let access_token = vendor::token_at(body, &r.access_token, &what(&r.access_token))?;
        let expires = match &r.expires {
            Some((p, format)) => vendor::parse_expiry(body, p, &what(p), *format)?,
            None => super::Expiry::Unknown,
        };
        let refresh_token = match &r.refresh_token {
            Some(p) => vendor::optional_token_at(body, p, &what(p))?,
            None => None,
        };
        // Checked so that a malformed answer is noticed; the engine has no use for the value.
        if let Some((p, format)) = &r.refresh_expires {
            vendor::parse_expiry(body, p, &what(p), *format)?;
        }
        Ok(Grant {
            kind,
            access_token,
            expires,
            refresh_token,
        })
    }
}

impl Custom {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        for name in k.secrets.keys() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                errors.push((
                    format!("secrets.{name}"),
                    "secret names use letters, digits, '-' and '_'".into(),
                ));
            }
        }
        let login = k
            .login
            .and_then(|r| Request::parse("login", r, &k.secrets, &mut errors));
        let refresh = k
            .refresh
            .and_then(|r| Request::parse("refresh", r, &k.secrets, &mut errors));
        if !errors.is_empty() {
            return Err(errors);
        }
        let uses_rt = refresh
            .as_ref()
            .is_some_and(|r| r.uses(Template::uses_refresh_token));
        let uses_at = refresh
            .as_ref()
            .is_some_and(|r| r.uses(Template::uses_access_token));
        if refresh.is_some() && !uses_rt && !uses_at {
            errors.push((
                "refresh".into(),
                "must use {refresh_token} or {access_token} somewhere (otherwise it is a login)"
                    .into(),
            ));
        }
        if login.is_none() && (refresh.is_none() || k.refresh_token.is_none() || !uses_rt) {
            errors.push((
                "login".into(),
                "is required unless a `refresh` using {refresh_token} starts from a bootstrap `refresh_token`".into(),
            ));
        }
        if k.refresh_token.is_some() && !uses_rt {
            errors.push((
                "refresh_token".into(),
                "a bootstrap refresh token needs a `refresh` request that uses {refresh_token}"
                    .into(),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Custom {
            secrets: k.secrets,
            bootstrap: k.refresh_token,
            login,
            refresh,
            refresh_with_access_token: uses_at && !uses_rt,
        })
    }

    async fn call(
        &self,
        request: &Request,
        kind: GrantKind,
        held: &Held,
        client: &ProviderClient,
    ) -> Result<Grant, DialectError> {
        let mut secrets = BTreeMap::new();
        for t in request.templates() {
            for name in t.secret_names() {
                if let Some(source) = self.secrets.get(&name) {
                    if !secrets.contains_key(&name) {
                        let value = vendor::resolve(source, &format!("secrets.{name}"))?;
                        secrets.insert(name, value);
                    }
                }
            }
        }
        let nonce = super::oauth2::random_hex(16);
        let ctx = Context {
            secrets: &secrets,
            refresh_token: held.refresh_token.as_ref(),
            access_token: held.access_token.as_ref(),
            now_ms: vendor::now_ms(),
            nonce: &nonce,
        };
        let builder = request.build(client, &ctx)?;
        let response = client.send(builder).await?;
        request.read(&response, kind)
    }
}

#[async_trait]
impl Dialect for Custom {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.login {
            parts.push(format!("login {}", l.describe()));
        }
        if let Some(r) = &self.refresh {
            parts.push(format!("refresh {}", r.describe()));
        }
        if self.bootstrap.is_some() {
            parts.push("from a bootstrap refresh token".into());
        }
        format!("custom: {}", parts.join("; "))
    }

    fn account(&self) -> String {
        // The login's inputs and the secrets' origins name the account; a bootstrap refresh
        // token by where it is read from. The refresh request's body is left out: it carries
        // the held tokens, not the account.
        let mut parts = Vec::new();
        if let Some(l) = &self.login {
            parts.push(format!("login {}", l.inputs()));
        }
        if let Some(r) = &self.refresh {
            parts.push(format!("refresh {}", r.describe()));
        }
        for (name, source) in &self.secrets {
            parts.push(format!("secret {name} from {}", source.origin()));
        }
        if let Some(b) = &self.bootstrap {
            parts.push(format!("bootstrap refresh token from {}", b.origin()));
        }
        format!("custom: {}", parts.join("; "))
    }

    fn endpoints(&self) -> Vec<String> {
        [&self.login, &self.refresh]
            .into_iter()
            .flatten()
            .map(|r| r.url.source().to_string())
            .collect()
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        let mut out: Vec<(String, &SecretSource)> = self
            .secrets
            .iter()
            .map(|(name, s)| (format!("secrets.{name}"), s))
            .collect();
        if let Some(b) = &self.bootstrap {
            out.push(("refresh_token".into(), b));
        }
        out
    }

    fn bootstrap_refresh_token(&self) -> Option<&SecretSource> {
        self.bootstrap.as_ref()
    }

    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        if let Some(refresh) = &self.refresh {
            if self.refresh_with_access_token {
                if held.access_token.is_some() {
                    match self.call(refresh, GrantKind::Refresh, held, client).await {
                        Err(e) if e.class == ErrorClass::Relogin => {}
                        other => return other,
                    }
                }
            } else if held.refresh_token.is_some() {
                return self.call(refresh, GrantKind::Refresh, held, client).await;
            }
        }
        match &self.login {
            Some(login) => self.call(login, GrantKind::Login, held, client).await,
            None => Err(DialectError::fatal(
                "no usable refresh token and no `login` configured; write a new bootstrap refresh token to `refresh_token`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Custom, Vec<(String, String)>> {
        use figment::providers::Format;
        let keys: figment::value::Dict =
            figment::Figment::from(figment::providers::Toml::string(toml_text))
                .extract()
                .unwrap();
        Custom::from_keys(keys)
    }

    const CLOUDREVE: &str = r#"
secrets = { password = "pw" }
[login]
url = "http://127.0.0.1:1/api/v4/session/token"
json = { email = "a@b", password = "{secret.password}" }
[login.response]
access_token = "/data/token/access_token"
expires = "/data/token/access_expires"
expires_format = "rfc3339"
refresh_token = "/data/token/refresh_token"
success = { pointer = "/code", equals = 0 }
error_code = "/code"
relogin_codes = [40020]
fatal_codes = [40080, 40017, 40018, 203]
[refresh]
url = "http://127.0.0.1:1/api/v4/session/token/refresh"
json = { refresh_token = "{refresh_token}" }
[refresh.response]
access_token = "/data/access_token"
expires = "/data/access_expires"
expires_format = "rfc3339"
refresh_token = "/data/refresh_token"
success = { pointer = "/code", equals = 0 }
error_code = "/code"
relogin_codes = [40020]
fatal_codes = [40080]
"#;

    fn resp(status: u16, body: &str) -> ProviderResponse {
        ProviderResponse {
            status,
            retry_after: None,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn the_account_is_the_login_inputs_and_the_secrets_origins() {
        let account = |text: &str| parse(text).unwrap().account();
        let alice = account(CLOUDREVE);
        assert!(!alice.contains("\"pw\""), "{alice}");
        assert_ne!(alice, account(&CLOUDREVE.replace("a@b", "c@d")));
        assert_ne!(
            alice,
            account(
                &CLOUDREVE.replace("{ password = \"pw\" }", "{ password = { file = \"/p\" } }")
            )
        );
        // What the refresh sends (the held tokens) is not the account.
        assert_eq!(
            alice,
            account(&CLOUDREVE.replace(
                "json = { refresh_token = \"{refresh_token}\" }",
                "form = { refresh_token = \"{refresh_token}\" }"
            ))
        );
    }

    #[test]
    fn reads_answers_through_pointers_and_classifies_codes() {
        let c = parse(CLOUDREVE).unwrap();
        let login = c.login.as_ref().unwrap();
        let refresh = c.refresh.as_ref().unwrap();
        let g = login
            .read(
                &resp(200, r#"{"code":0,"data":{"token":{"access_token":"a","refresh_token":"r","access_expires":"2099-01-01T00:00:00.5+08:00"}}}"#),
                GrantKind::Login,
            )
            .unwrap();
        assert_eq!(g.access_token.expose(), "a");
        assert_eq!(g.refresh_token.unwrap().expose(), "r");
        let class = |r: &Request, b: &str, k| r.read(&resp(200, b), k).unwrap_err().class;
        assert_eq!(
            class(refresh, r#"{"code":40020}"#, GrantKind::Refresh),
            ErrorClass::Relogin
        );
        assert_eq!(
            class(login, r#"{"code":40080}"#, GrantKind::Login),
            ErrorClass::Fatal
        );
        assert_eq!(
            class(login, r#"{"code":1}"#, GrantKind::Login),
            ErrorClass::Fatal
        );
        assert_eq!(
            class(refresh, r#"{"code":1}"#, GrantKind::Refresh),
            ErrorClass::Relogin
        );
        assert!(matches!(
            refresh
                .read(&resp(503, ""), GrantKind::Refresh)
                .unwrap_err()
                .class,
            ErrorClass::Transient { .. }
        ));
        let e = refresh
            .read(
                &resp(200, r#"{"code":0,"data":{"access_token":3}}"#),
                GrantKind::Refresh,
            )
            .unwrap_err();
        assert!(e.message.contains("/data/access_token"), "{}", e.message);
        let e = refresh
            .read(
                &resp(
                    200,
                    r#"{"code":0,"data":{"access_token":"a","access_expires":"tomorrow"}}"#,
                ),
                GrantKind::Refresh,
            )
            .unwrap_err();
        assert!(
            e.message.contains("access_expires") && e.message.contains("rfc3339"),
            "{}",
            e.message
        );
        assert!(
            refresh
                .read(&resp(200, r#"{"code":0,"da"#), GrantKind::Refresh)
                .is_err()
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let keys = |t: &str| {
            parse(t)
                .err()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert!(
            keys(&CLOUDREVE.replace("{secret.password}", "{secret.pasword}"))
                .contains(&"login".to_string())
        );
        assert!(
            keys(&CLOUDREVE.replace("{refresh_token}\" }", "{refresh_token\" }"))
                .contains(&"refresh.json.refresh_token".to_string())
        );
        assert!(
            keys(&CLOUDREVE.replace(
                "expires_format = \"rfc3339\"\nrefresh_token = \"/data/token",
                "expires_format = \"iso\"\nrefresh_token = \"/data/token"
            ))
            .iter()
            .any(|k| k.contains("expires_format"))
        );
        assert!(
            keys(&CLOUDREVE.replace(
                "access_token = \"/data/access_token\"",
                "access_token = \"data.access_token\""
            ))
            .contains(&"refresh.response.access_token".to_string())
        );
        assert!(
            keys(&CLOUDREVE.replace("[login]\n", "[login]\nmethdo = \"GET\"\n"))
                .iter()
                .any(|k| k.contains("methdo") || k.starts_with("login"))
        );
        assert!(
            keys(&CLOUDREVE.replace(
                "error_code = \"/code\"\nrelogin_codes = [40020]\nfatal_codes = [40080]\n",
                "relogin_codes = [40020]\n"
            ))
            .contains(&"refresh.response.error_code".to_string())
        );
        // No login and no bootstrap: nothing could ever obtain a token.
        let no_login = CLOUDREVE.split("[refresh]").nth(1).unwrap();
        let no_login = format!("secrets = {{ password = \"pw\" }}\n[refresh]{no_login}");
        assert!(keys(&no_login).contains(&"login".to_string()));
        assert!(parse(&format!("refresh_token = \"boot\"\n{no_login}")).is_ok());
    }

    #[test]
    fn typed_json_values_render_to_their_type_or_fail_naming_the_key() {
        let body = |json: &str| {
            let c = parse(&CLOUDREVE.replace(
                "json = { email = \"a@b\", password = \"{secret.password}\" }",
                json,
            ));
            c.map(|c| c.login.unwrap().json.unwrap())
        };
        let t = body(r#"json = { ts = { number = "{now_ms}" }, on = { bool = "{secret.password}" }, f = { number = "1.5e3" }, s = "7", o = { object = { bool = "x" } }, l = [{ bool = "false" }] }"#).unwrap();
        let mut secrets = BTreeMap::new();
        secrets.insert("password".to_string(), Secret::new("true"));
        fn ctx(secrets: &BTreeMap<String, Secret>) -> Context<'_> {
            Context {
                secrets,
                refresh_token: None,
                access_token: None,
                now_ms: 1700000000123,
                nonce: "n",
            }
        }
        let v = t.render(&ctx(&secrets), "login.json").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ts": 1700000000123u64, "on": true, "f": 1500.0, "s": "7", "o": {"bool": "x"}, "l": [false]})
        );
        secrets.insert("password".to_string(), Secret::new("secret-yes"));
        let e = t.render(&ctx(&secrets), "login.json").unwrap_err();
        assert!(
            e.message.contains("login.json.on") && !e.message.contains("secret-yes"),
            "{}",
            e.message
        );
        for text in [
            "",
            " 1",
            "1 ",
            "01",
            "0x10",
            "NaN",
            "1e999",
            "18446744073709551616",
        ] {
            assert!(JsonType::Number.value(text).is_err(), "{text:?}");
        }
        assert_eq!(
            JsonType::Number.value("-9223372036854775808").unwrap(),
            serde_json::json!(i64::MIN)
        );
        for text in ["True", "1", "yes", " true"] {
            assert!(JsonType::Bool.value(text).is_err(), "{text:?}");
        }
        let keys = |json: &str| -> Vec<String> {
            body(json)
                .unwrap_err()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(
            keys(r#"json = { a = { number = "x{now_s}" } }"#),
            ["login.json.a"]
        );
        assert_eq!(
            keys(r#"json = { a = [{ bool = "{now_s}" }] }"#),
            ["login.json.a[0]"]
        );
        assert_eq!(keys(r#"json = { a = { number = 5 } }"#), ["login.json.a"]);
        assert_eq!(keys(r#"json = { a = { object = 5 } }"#), ["login.json.a"]);
        assert_eq!(
            keys(r#"json = { a = { number = "{nope}" } }"#),
            ["login.json.a"]
        );
        // Checked at each login when a secret or the nonce decides.
        assert!(body(r#"json = { a = { number = "{nonce}" } }"#).is_ok());
    }

    #[test]
    fn builds_requests_without_exposing_values() {
        let c = parse(CLOUDREVE).unwrap();
        let d = c.describe();
        assert!(
            d.contains("/api/v4/session/token") && !d.contains("pw\""),
            "{d}"
        );
        let keys: Vec<String> = c.secret_sources().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["secrets.password"]);
    }
}
