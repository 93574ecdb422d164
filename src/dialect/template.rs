//! Templated values for the `custom` dialect, parsed once at config time.
//!
//! A template is text with `{…}` placeholders; `{{` and `}}` stand for literal braces. Inside a
//! placeholder is an expression: terms joined with `+` (concatenation), where a term is
//!
//! - a quoted literal: `'text'` or `"text"` (no escapes inside),
//! - a variable: `secret.NAME` (a key of the credential's `secrets` table), `refresh_token`,
//!   `access_token` (the tokens currently held), `now_s`, `now_ms` (Unix time in seconds or
//!   milliseconds), `nonce` (32 random hex digits),
//! - a function call: `sha256(x)` and `hmac_sha256(key, message)` (lowercase hex),
//!   `base64(x)`, `base64url(x)` (unpadded), `upper(x)`, `lower(x)`.
//!
//! One request renders all its templates with the same `now_*` and `nonce`, so a signature can
//! cover the timestamp sent beside it. Examples:
//! `"Basic {base64('my-client:' + secret.client_secret)}"`,
//! `"{sha256('app-key' + now_ms + secret.app_secret)}"`.
//! Rendered values are held as secrets and never logged.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;

use super::vendor;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq)]
enum Var {
    Secret(String),
    RefreshToken,
    AccessToken,
    NowS,
    NowMs,
    Nonce,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Sha256,
    HmacSha256,
    Base64,
    Base64Url,
    Upper,
    Lower,
}

impl Func {
    fn parse(name: &str) -> Option<(Func, usize)> {
        Some(match name {
            "sha256" => (Func::Sha256, 1),
            "hmac_sha256" => (Func::HmacSha256, 2),
            "base64" => (Func::Base64, 1),
            "base64url" => (Func::Base64Url, 1),
            "upper" => (Func::Upper, 1),
            "lower" => (Func::Lower, 1),
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Lit(String),
    Var(Var),
    Call(Func, Vec<Expr>),
    Concat(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Expr(Expr),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// What a rendering may use: the resolved secrets the template names, the held tokens, and one
/// clock reading and nonce for the whole request.
pub struct Context<'a> {
    pub secrets: &'a BTreeMap<String, Secret>,
    pub refresh_token: Option<&'a Secret>,
    pub access_token: Option<&'a Secret>,
    pub now_ms: u128,
    pub nonce: &'a str,
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    _src: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c == ' ') {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!(
                "expected '{c}' at character {} of the placeholder",
                self.pos + 1
            ))
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut terms = vec![self.term()?];
        loop {
            self.skip_ws();
            if self.peek() == Some('+') {
                self.pos += 1;
                terms.push(self.term()?);
            } else {
                break;
            }
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Concat(terms)
        })
    }

    fn term(&mut self) -> Result<Expr, String> {
        self.skip_ws();
        match self.peek() {
            Some(q @ ('\'' | '"')) => {
                self.pos += 1;
                let start = self.pos;
                while self.peek().is_some_and(|c| c != q) {
                    self.pos += 1;
                }
                if self.peek() != Some(q) {
                    return Err("unterminated quoted literal".into());
                }
                let lit: String = self.chars[start..self.pos].iter().collect();
                self.pos += 1;
                Ok(Expr::Lit(lit))
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
                {
                    self.pos += 1;
                }
                let name: String = self.chars[start..self.pos].iter().collect();
                self.skip_ws();
                if self.peek() == Some('(') {
                    self.pos += 1;
                    let (func, arity) =
                        Func::parse(&name).ok_or_else(|| format!("unknown function `{name}`; one of: sha256, hmac_sha256, base64, base64url, upper, lower"))?;
                    let mut args = Vec::new();
                    self.skip_ws();
                    if self.peek() != Some(')') {
                        args.push(self.expr()?);
                        loop {
                            self.skip_ws();
                            if self.peek() == Some(',') {
                                self.pos += 1;
                                args.push(self.expr()?);
                            } else {
                                break;
                            }
                        }
                    }
                    self.expect(')')?;
                    if args.len() != arity {
                        return Err(format!(
                            "`{name}` takes {arity} argument(s), not {}",
                            args.len()
                        ));
                    }
                    return Ok(Expr::Call(func, args));
                }
                let var = match name.as_str() {
                    "refresh_token" => Var::RefreshToken,
                    "access_token" => Var::AccessToken,
                    "now_s" => Var::NowS,
                    "now_ms" => Var::NowMs,
                    "nonce" => Var::Nonce,
                    other => match other.strip_prefix("secret.") {
                        Some(s) if !s.is_empty() && !s.contains('.') => Var::Secret(s.to_string()),
                        _ => {
                            return Err(format!(
                                "unknown name `{other}`; use secret.NAME, refresh_token, access_token, now_s, now_ms or nonce"
                            ));
                        }
                    },
                };
                Ok(Expr::Var(var))
            }
            _ => Err(format!(
                "expected a quoted literal, a name or a function at character {} of the placeholder",
                self.pos + 1
            )),
        }
    }
}

impl Template {
    /// Parses `source`; the error says what is wrong (the caller names the key).
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err("a lone '}' (write '}}' for a literal brace)".into()),
                '{' => {
                    // The placeholder runs to the matching '}' outside quotes.
                    let mut inner = String::new();
                    let mut quote: Option<char> = None;
                    let mut closed = false;
                    for c in chars.by_ref() {
                        match (quote, c) {
                            (None, '}') => {
                                closed = true;
                                break;
                            }
                            (None, '\'' | '"') => quote = Some(c),
                            (Some(q), c) if c == q => quote = None,
                            _ => {}
                        }
                        inner.push(c);
                    }
                    if !closed {
                        return Err("a '{' without its '}' (write '{{' for a literal brace)".into());
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    let mut p = Parser {
                        chars: inner.chars().collect(),
                        pos: 0,
                        _src: &inner,
                    };
                    let expr = p.expr()?;
                    p.skip_ws();
                    if p.pos != p.chars.len() {
                        return Err(format!(
                            "unexpected text at character {} of the placeholder `{{{inner}}}`",
                            p.pos + 1
                        ));
                    }
                    parts.push(Part::Expr(expr));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written (for `describe`; it names secrets, never their values).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template is plain text.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    fn visit(&self, f: &mut dyn FnMut(&Var)) {
        fn walk(e: &Expr, f: &mut dyn FnMut(&Var)) {
            match e {
                Expr::Lit(_) => {}
                Expr::Var(v) => f(v),
                Expr::Call(_, args) | Expr::Concat(args) => args.iter().for_each(|a| walk(a, f)),
            }
        }
        for p in &self.parts {
            if let Part::Expr(e) = p {
                walk(e, f);
            }
        }
    }

    /// The `secret.NAME`s this template uses.
    pub fn secret_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.visit(&mut |v| {
            if let Var::Secret(s) = v {
                out.insert(s.clone());
            }
        });
        out
    }

    pub fn uses_refresh_token(&self) -> bool {
        let mut found = false;
        self.visit(&mut |v| found |= *v == Var::RefreshToken);
        found
    }

    pub fn uses_access_token(&self) -> bool {
        let mut found = false;
        self.visit(&mut |v| found |= *v == Var::AccessToken);
        found
    }

    /// Whether the rendering depends on nothing but the clock (no secret, token or nonce), so
    /// that one rendering at config time shows what every later one will look like.
    pub fn depends_only_on_the_clock(&self) -> bool {
        let mut only = true;
        self.visit(&mut |v| only &= matches!(v, Var::NowS | Var::NowMs));
        only
    }

    /// Renders the template; the error names the missing input, never a value.
    pub fn render(&self, ctx: &Context<'_>) -> Result<Secret, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Expr(e) => out.push_str(&eval(e, ctx)?),
            }
        }
        Ok(Secret::new(out))
    }
}

fn eval(e: &Expr, ctx: &Context<'_>) -> Result<String, String> {
    Ok(match e {
        Expr::Lit(s) => s.clone(),
        Expr::Var(v) => match v {
            Var::Secret(name) => ctx
                .secrets
                .get(name)
                .map(|s| s.expose().to_string())
                .ok_or_else(|| format!("secret `{name}` is not available"))?,
            Var::RefreshToken => ctx
                .refresh_token
                .map(|s| s.expose().to_string())
                .ok_or("no refresh token is held")?,
            Var::AccessToken => ctx
                .access_token
                .map(|s| s.expose().to_string())
                .ok_or("no access token is held")?,
            Var::NowS => (ctx.now_ms / 1000).to_string(),
            Var::NowMs => ctx.now_ms.to_string(),
            Var::Nonce => ctx.nonce.to_string(),
        },
        Expr::Concat(parts) => {
            let mut s = String::new();
            for p in parts {
                s.push_str(&eval(p, ctx)?);
            }
            s
        }
        Expr::Call(f, args) => {
            let a = eval(&args[0], ctx)?;
            match f {
                Func::Sha256 => vendor::sha256_hex(a.as_bytes()),
                Func::HmacSha256 => {
                    let msg = eval(&args[1], ctx)?;
                    vendor::hmac_sha256_hex(a.as_bytes(), msg.as_bytes())
                }
                Func::Base64 => base64::engine::general_purpose::STANDARD.encode(a),
                Func::Base64Url => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(a),
                Func::Upper => a.to_uppercase(),
                Func::Lower => a.to_lowercase(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str) -> Result<String, String> {
        let mut secrets = BTreeMap::new();
        secrets.insert("pw".to_string(), Secret::new("p@ss"));
        let rt = Secret::new("rt-1");
        let ctx = Context {
            secrets: &secrets,
            refresh_token: Some(&rt),
            access_token: None,
            now_ms: 1700000000123,
            nonce: "n0nce",
        };
        Template::parse(src)?
            .render(&ctx)
            .map(|s| s.expose().to_string())
    }

    #[test]
    fn renders_variables_functions_and_escapes() {
        assert_eq!(render("plain").unwrap(), "plain");
        assert_eq!(
            render("{{x}} {now_s}/{now_ms}").unwrap(),
            "{x} 1700000000/1700000000123"
        );
        assert_eq!(render("{ refresh_token }").unwrap(), "rt-1");
        assert_eq!(
            render("Basic {base64('id:' + secret.pw)}").unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("id:p@ss")
            )
        );
        assert_eq!(
            render("{sha256('ak' + now_ms + secret.pw)}").unwrap(),
            vendor::sha256_hex(b"ak1700000000123p@ss")
        );
        assert_eq!(
            render("{hmac_sha256(\"Jefe\", 'what do ya want for nothing?')}").unwrap(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            render("{upper(sha256(nonce))}").unwrap(),
            vendor::sha256_hex(b"n0nce").to_uppercase()
        );
        assert_eq!(render("{base64url('a?b')}").unwrap(), "YT9i");
        assert_eq!(render("{'}'}").unwrap(), "}");
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        for (src, needle) in [
            ("{nope}", "unknown name"),
            ("{md5(x)}", "unknown function"),
            ("{sha256(now_s, now_ms)}", "takes 1"),
            ("{hmac_sha256(now_s)}", "takes 2"),
            ("{now_s", "without its"),
            ("a}", "lone"),
            ("{'abc}", "without its"),
            ("{now_s now_ms}", "unexpected text"),
            ("{sha256(now_s}", "expected ')'"),
            ("{secret.}", "unknown name"),
            ("{}", "expected a quoted literal"),
        ] {
            let e = Template::parse(src).unwrap_err();
            assert!(e.contains(needle), "{src}: {e}");
        }
    }

    #[test]
    fn reports_what_it_uses_and_what_is_missing() {
        let t = Template::parse("{secret.a}{sha256(secret.b + access_token)}").unwrap();
        assert_eq!(t.secret_names().into_iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(t.uses_access_token() && !t.uses_refresh_token());
        assert!(!t.is_literal());
        assert!(Template::parse("x").unwrap().is_literal());
        let e = render("{access_token}").unwrap_err();
        assert!(e.contains("no access token"));
        let e = render("{secret.other}").unwrap_err();
        assert!(e.contains("other") && !e.contains("p@ss"));
    }
}
