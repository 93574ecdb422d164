//! HTTP/1.1 on the wire for the conformance suite: a strict framing parser (RFC 9112 §6), the
//! canonical form transcripts are compared in, and a readable byte diff. `peers` holds the
//! scripted upstream and the raw client that produce those transcripts.

// ---------------------------------------------------------------------------------------------
// Parsing

/// One message head: its start line, its fields (names lower-cased) and its length on the wire.
#[derive(Clone, Debug)]
pub struct Head {
    pub start: String,
    pub fields: Vec<(String, Vec<u8>)>,
    pub len: usize,
}

impl Head {
    pub fn values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
    pub fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }
    /// The comma-separated members of every `name` field, trimmed, lower-cased.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|m| String::from_utf8_lossy(m.trim_ascii()).to_ascii_lowercase())
            .filter(|m| !m.is_empty())
            .collect()
    }
    pub fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or("")
    }
    pub fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }
    /// A status line's code; 0 for a request line.
    pub fn status(&self) -> u16 {
        if !self.start.starts_with("HTTP/") {
            return 0;
        }
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Parses a head at the start of `buf`: `Ok(None)` until its empty line has arrived.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err("bare LF in a head".into());
            }
        }
        return Ok(None);
    };
    // Every line with its CRLF; the empty line that ends the head is left out.
    let text = &buf[..end + 2];
    let mut lines = text[..text.len() - 1].split(|b| *b == b'\n');
    let start = lines.next().unwrap_or_default();
    let start = start.strip_suffix(b"\r").unwrap_or(start);
    if start.is_empty() || start.contains(&b'\r') || !start.is_ascii() {
        return Err(format!(
            "bad start line {:?}",
            String::from_utf8_lossy(start)
        ));
    }
    let mut fields = Vec::new();
    for line in lines {
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err("bare LF in a head".into());
        };
        if line.contains(&b'\r') {
            return Err("bare CR in a head".into());
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| format!("field line without colon {:?}", show(line)))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(format!("bad field name {:?}", show(name)));
        }
        fields.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            line[colon + 1..].trim_ascii().to_vec(),
        ));
    }
    Ok(Some(Head {
        start: String::from_utf8_lossy(start).into_owned(),
        fields,
        len: end + 4,
    }))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
    /// After a 101 or a 2xx to CONNECT: what follows is no longer HTTP.
    Tunnel,
}

fn content_length(head: &Head) -> Result<Option<usize>, String> {
    let mut found: Option<usize> = None;
    for v in head.values("content-length") {
        // One value per field: a list, even of equal values, is left to the peer to refuse.
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 15 {
            return Err(format!("bad Content-Length {:?}", show(v)));
        }
        let n: usize = std::str::from_utf8(v).unwrap().parse().unwrap();
        if found.is_some_and(|f| f != n) {
            return Err("conflicting Content-Length fields".into());
        }
        found = Some(n);
    }
    Ok(found)
}

pub fn request_framing(head: &Head) -> Result<Framing, String> {
    if head.has("transfer-encoding") {
        if head.has("content-length") {
            return Err("both Transfer-Encoding and Content-Length".into());
        }
        return match head.list("transfer-encoding").last().map(String::as_str) {
            Some("chunked") => Ok(Framing::Chunked),
            _ => Err("a request's last transfer coding is not chunked".into()),
        };
    }
    Ok(match content_length(head)? {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

pub fn response_framing(head: &Head, method: &str) -> Result<Framing, String> {
    let status = head.status();
    if status == 101 || (method == "CONNECT" && (200..300).contains(&status)) {
        return Ok(Framing::Tunnel);
    }
    if (100..200).contains(&status) || status == 204 || status == 304 || method == "HEAD" {
        return Ok(Framing::None);
    }
    if head.has("transfer-encoding") {
        return Ok(
            match head.list("transfer-encoding").last().map(String::as_str) {
                Some("chunked") => Framing::Chunked,
                _ => Framing::UntilClose,
            },
        );
    }
    Ok(match content_length(head)? {
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// A chunked body: its data, its trailer section (field lines with their CRLFs) and how many
/// bytes it took on the wire; `Ok(None)` until all of it has arrived.
pub fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>, usize)>, String> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            if buf[at..].contains(&b'\n') {
                return Err("bare LF in a chunk-size line".into());
            }
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return Err(format!(
                "bare CR or LF in a chunk-size line {:?}",
                show(line)
            ));
        }
        let hex_len = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = &line[hex_len..];
        if hex_len == 0 || hex_len > 12 || !(rest.is_empty() || rest.starts_with(b";")) {
            return Err(format!("bad chunk-size line {:?}", show(line)));
        }
        let size = usize::from_str_radix(std::str::from_utf8(&line[..hex_len]).unwrap(), 16)
            .map_err(|e| e.to_string())?;
        at += eol + 2;
        if size == 0 {
            // The trailer section, up to its empty line.
            let mut trailer_end = at;
            loop {
                let Some(eol) = buf[trailer_end..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if eol == 0 {
                    let trailer = buf[at..trailer_end].to_vec();
                    return Ok(Some((data, trailer, trailer_end + 2)));
                }
                trailer_end += eol + 2;
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        data.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

/// One whole message.
#[derive(Clone, Debug)]
pub struct Message {
    pub head: Head,
    pub raw_head: Vec<u8>,
    pub framing: Framing,
    pub body: Vec<u8>,
    pub trailer: Vec<u8>,
    /// Bytes it took on the wire.
    pub len: usize,
}

impl Message {
    /// The form transcripts are compared in: the head as it came, then the body; a chunked
    /// body as one chunk (a proxy that re-chunks picks its sizes by its read boundaries, which
    /// carry no meaning, RFC 9112 §7.1) with its trailer section as it came.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = self.raw_head.clone();
        match self.framing {
            Framing::Chunked => {
                if !self.body.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
                    out.extend_from_slice(&self.body);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                out.extend_from_slice(&self.trailer);
                out.extend_from_slice(b"\r\n");
            }
            _ => out.extend_from_slice(&self.body),
        }
        out
    }
}

pub enum Parsed {
    Complete(Message),
    /// The head has arrived, not yet all of the body.
    HeadOnly(Head),
    Partial,
    Invalid(String),
}

fn parse_body(buf: &[u8], head: Head, framing: Framing, eof: bool) -> Parsed {
    let raw_head = buf[..head.len].to_vec();
    let rest = &buf[head.len..];
    let done = |body: Vec<u8>, trailer: Vec<u8>, used: usize, head: Head| {
        Parsed::Complete(Message {
            len: head.len + used,
            head,
            raw_head: raw_head.clone(),
            framing,
            body,
            trailer,
        })
    };
    match framing {
        Framing::None | Framing::Tunnel => done(Vec::new(), Vec::new(), 0, head),
        Framing::Length(n) if rest.len() >= n => done(rest[..n].to_vec(), Vec::new(), n, head),
        Framing::Length(_) => Parsed::HeadOnly(head),
        Framing::Chunked => match parse_chunked(rest) {
            Ok(Some((body, trailer, used))) => done(body, trailer, used, head),
            Ok(None) => Parsed::HeadOnly(head),
            Err(e) => Parsed::Invalid(e),
        },
        Framing::UntilClose if eof => done(rest.to_vec(), Vec::new(), rest.len(), head),
        Framing::UntilClose => Parsed::HeadOnly(head),
    }
}

pub fn parse_request(buf: &[u8]) -> Parsed {
    match parse_head(buf) {
        Err(e) => Parsed::Invalid(e),
        Ok(None) => Parsed::Partial,
        Ok(Some(head)) => match request_framing(&head) {
            Err(e) => Parsed::Invalid(e),
            Ok(framing) => parse_body(buf, head, framing, false),
        },
    }
}

pub fn parse_response(buf: &[u8], method: &str, eof: bool) -> Parsed {
    match parse_head(buf) {
        Err(e) => Parsed::Invalid(e),
        Ok(None) => Parsed::Partial,
        Ok(Some(head)) => match response_framing(&head, method) {
            Err(e) => Parsed::Invalid(e),
            Ok(framing) => parse_body(buf, head, framing, eof),
        },
    }
}

/// A transcript cut into messages: the whole ones, then whatever did not parse as one.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    pub messages: Vec<Message>,
    /// Bytes after a tunnel began, or that are not (or not yet) a whole message.
    pub rest: Vec<u8>,
    /// Why `rest` is not a message, when it is not a tunnel or an incomplete one.
    pub invalid: Option<String>,
}

impl Transcript {
    pub fn canonical(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.messages.iter().flat_map(|m| m.canonical()).collect();
        out.extend_from_slice(&self.rest);
        out
    }
}

pub fn requests(buf: &[u8]) -> Transcript {
    let mut t = Transcript::default();
    let mut at = 0;
    while at < buf.len() {
        match parse_request(&buf[at..]) {
            Parsed::Complete(m) => {
                at += m.len;
                // After an upgrade request the bytes may be another protocol, or (the upgrade
                // refused) the next request: they are read as requests, and kept as they came
                // when they are not.
                let tunnel = m.head.method() == "CONNECT";
                t.messages.push(m);
                if tunnel {
                    break;
                }
            }
            Parsed::Invalid(e) => {
                t.invalid = Some(e);
                break;
            }
            Parsed::HeadOnly(_) | Parsed::Partial => break,
        }
    }
    t.rest = buf[at..].to_vec();
    t
}

/// Answers to requests with `methods`, in order; a 1xx does not use up a request.
pub fn responses(buf: &[u8], methods: &[String], eof: bool) -> Transcript {
    let mut t = Transcript::default();
    let mut at = 0;
    let mut answered = 0;
    while at < buf.len() {
        let method = methods.get(answered).map_or("GET", String::as_str);
        match parse_response(&buf[at..], method, eof) {
            Parsed::Complete(m) => {
                at += m.len;
                let status = m.head.status();
                let framing = m.framing;
                t.messages.push(m);
                if framing == Framing::Tunnel {
                    break;
                }
                if !(100..200).contains(&status) {
                    answered += 1;
                }
            }
            Parsed::Invalid(e) => {
                t.invalid = Some(e);
                break;
            }
            Parsed::HeadOnly(_) | Parsed::Partial => break,
        }
    }
    t.rest = buf[at..].to_vec();
    t
}

/// The methods of the requests in `client_bytes`, for reading the answers to them.
pub fn methods_of(client_bytes: &[u8]) -> Vec<String> {
    requests(client_bytes)
        .messages
        .iter()
        .map(|m| m.head.method().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Showing bytes

/// Bytes as readable text: CRLF shown and broken after, other controls escaped, long runs of
/// one byte summarised.
pub fn show(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let run = bytes[i..].iter().take_while(|x| **x == b).count();
        if run >= 24 {
            out.push_str(&format!("<{run} x {:?}>", b as char));
            i += run;
            continue;
        }
        match b {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                out.push_str("\\r\\n\n");
                i += 2;
                continue;
            }
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
        i += 1;
    }
    out
}

/// A line diff of two byte strings as [`show`] renders them: `-` expected, `+` actual.
pub fn diff(expected: &[u8], actual: &[u8]) -> String {
    let (e, a) = (show(expected), show(actual));
    let el: Vec<&str> = e.lines().collect();
    let al: Vec<&str> = a.lines().collect();
    if el.len() * al.len() > 250_000 {
        return format!("--- expected\n{e}\n+++ actual\n{a}\n");
    }
    // Longest common subsequence, then walk it.
    let mut lcs = vec![vec![0u32; al.len() + 1]; el.len() + 1];
    for i in (0..el.len()).rev() {
        for j in (0..al.len()).rev() {
            lcs[i][j] = if el[i] == al[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < el.len() || j < al.len() {
        if i < el.len() && j < al.len() && el[i] == al[j] {
            lines.push(format!("    {}", el[i]));
            i += 1;
            j += 1;
        } else if j < al.len() && (i == el.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(format!("  + {}", al[j]));
            j += 1;
        } else {
            lines.push(format!("  - {}", el[i]));
            i += 1;
        }
    }
    // Long runs of one line (a flood of 1xx, a body cut into 1-byte chunks) shown once.
    let mut out = String::new();
    let mut k = 0;
    while k < lines.len() {
        let run = lines[k..].iter().take_while(|l| **l == lines[k]).count();
        out.push_str(&lines[k]);
        out.push('\n');
        if run > 3 {
            out.push_str(&format!("    ... the line above {} more times\n", run - 1));
            k += run;
        } else {
            k += 1;
        }
    }
    out
}

/// Replaces every occurrence of `from` in `bytes` with `to`.
pub fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Replaces the value of every `Date` field (in any case) with `<DATE>`.
pub fn normalise_date(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let at_line = i == 0 || bytes[i - 1] == b'\n';
        if at_line && bytes.len() >= i + 6 && bytes[i..i + 6].eq_ignore_ascii_case(b"date: ") {
            out.extend_from_slice(&bytes[i..i + 6]);
            out.extend_from_slice(b"<DATE>");
            let end = bytes[i..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(bytes.len(), |p| i + p);
            i = end;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}
