//! The differential HTTP/1 conformance suite (issue 18): a corpus of raw client requests and
//! scripted raw upstream answers, each sent with the write boundaries it names, through the
//! lean path and the full (`ProxyHttp`) path, compared byte for byte with the bytes the case
//! expects; then against a real nginx, as the upstream and as the reference proxy in front of
//! the same scripted upstream. tests/README.md describes the corpus and lists every allowed
//! difference with its reason; the runner prints them, and the known failures, at its end.

mod common;

#[path = "conformance/cases.rs"]
mod cases;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cases::{Case, Target};
use common::nginx::Nginx;
use common::raw::*;
use common::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Path {
    Lean,
    Full,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Lean => "lean",
            Path::Full => "full",
        }
    }
}

/// Cases that fail today for a defect of issue 18 not fixed on this branch yet: each still
/// asserts the correct bytes; the runner reports them (and fails when one starts passing, so
/// this list stays true).
const KNOWN_FAILING: &[(&str, Option<Path>, &str)] = &[
    (
        "websocket",
        Some(Path::Lean),
        "the lean path's own WebSocket tunnel (issue 18 defect 3's fix) adds `Transfer-Encoding: chunked` to the 101 (lean.rs downstream_response counts a 1xx as an answer with a body); RFC 9112 §6.1: no Transfer-Encoding in a 1xx",
    ),
    (
        "websocket-accepted",
        Some(Path::Lean),
        "as for `websocket`: `Transfer-Encoding: chunked` on the 101",
    ),
    (
        "websocket-accepted",
        Some(Path::Full),
        "issue 18 defect 3: bytes that follow the upgrade head in a later read, before the 101, fail the upgrade with a 400 ConnectError (boundaries byte-by-byte and crlf)",
    ),
    (
        "chunk-extension-bare-lf",
        None,
        "issue 18 defect 12: a bare LF in a chunk extension is accepted and moves where the chunk ends",
    ),
    (
        "pipelined-three",
        None,
        "NOT IN ISSUE 18's LIST: after the first of pipelined requests the connection closes, its answer having said keep-alive; the others go unanswered",
    ),
    (
        "http10-chunked-answer",
        None,
        "NOT IN ISSUE 18's LIST: an HTTP/1.0 client gets a chunked answer (RFC 9112 §6.1 forbids Transfer-Encoding in an answer to HTTP/1.0); lean.rs downstream_response, and pingora-proxy on the full path",
    ),
];

fn known_failing(case: &str, path: Path) -> Option<&'static str> {
    KNOWN_FAILING
        .iter()
        .find(|(c, p, _)| *c == case && p.is_none_or(|p| p == path))
        .map(|(_, _, why)| *why)
}

/// One tokenward under test, with the scripted upstream its route points at.
struct Subject {
    tw: Tokenward,
    upstream: RawUpstream,
    provider: FakeProvider,
}

async fn start_subject(path: Path) -> Subject {
    let provider = FakeProvider::start(3600, false, None).await;
    let upstream = RawUpstream::start();
    let fast = if path == Path::Lean { "true" } else { "false" };
    let tw = Tokenward::start_in_env(
        &format!("http://{}", upstream.addr),
        &oauth2_keys(&provider, ""),
        &[
            ("TOKENWARD_SERVER__HTTP1_FAST_PATH", fast),
            ("TOKENWARD_SERVER__THREADS", "1"),
        ],
    );
    tw.wait_ready().await;
    Subject {
        tw,
        upstream,
        provider,
    }
}

/// What one run of a case gave, normalised and in canonical form.
#[derive(Debug)]
struct Observed {
    upstream: Vec<Vec<u8>>,
    client: Vec<u8>,
    notes: Vec<String>,
}

/// Replaces what differs between runs and says nothing about framing: every token the
/// provider issued, and the upstream's address (its port is picked per run).
fn normalise(bytes: &[u8], tokens: &[String], upstream: SocketAddr) -> Vec<u8> {
    let mut out = normalise_date(bytes);
    for t in tokens {
        out = replace(&out, t.as_bytes(), b"<TOKEN>");
    }
    replace(&out, upstream.to_string().as_bytes(), b"<UPSTREAM>")
}

/// The requests on one upstream connection in canonical form, the sentinel's taken out.
fn canonical_upstream(bytes: &[u8]) -> Vec<u8> {
    let mut t = requests(bytes);
    t.messages.retain(|m| m.head.target() != SENTINEL_TARGET);
    t.canonical()
}

/// The client's answers in canonical form; with `sentinel`, the last answer must be the
/// sentinel's and is taken out.
fn canonical_client(
    sent: &[u8],
    received: &[u8],
    eof: bool,
    sentinel: bool,
) -> (Vec<u8>, Option<String>) {
    let mut t = responses(received, &methods_of(sent), eof);
    let mut note = None;
    if sentinel {
        let last = t.messages.last();
        if last.is_some_and(|m| m.head.status() == 200 && m.body == b"end") && t.rest.is_empty() {
            t.messages.pop();
        } else {
            note = Some("the sentinel's answer is not the last thing received".to_string());
        }
    }
    (t.canonical(), note)
}

fn run_case(
    case: &Case,
    path: Path,
    boundary: &Boundary,
    proxy: SocketAddr,
    admin: SocketAddr,
    upstream: &RawUpstream,
    tokens: &dyn Fn() -> Vec<String>,
) -> Observed {
    upstream.begin(case.upstream.clone(), boundary.clone());
    let addr = match case.target {
        Target::Proxy => proxy,
        Target::Admin => admin,
    };
    let client = run_client(
        addr,
        &case.client,
        boundary,
        case.end,
        case.final_answers(path),
        Some(upstream),
    );
    let up = upstream.finish();
    let tokens = tokens();
    if std::env::var_os("CONFORMANCE_VERBOSE").is_some() {
        println!(
            "=== {} [{}]\nclient sent:\n{}\nclient received (closed: {}):\n{}",
            case.name,
            boundary.name(),
            show(&client.sent),
            client.closed,
            show(&client.received)
        );
        for (i, c) in up.connections.iter().enumerate() {
            println!("upstream connection {i} received:\n{}", show(c));
        }
    }
    let mut notes = client.notes.clone();
    notes.extend(up.notes.clone());
    let upstream_conns: Vec<Vec<u8>> = up
        .connections
        .iter()
        .map(|c| canonical_upstream(&normalise(c, &tokens, upstream.addr)))
        .filter(|c| !c.is_empty())
        .collect();
    let received = normalise(&client.received, &tokens, upstream.addr);
    let (client_bytes, note) = canonical_client(
        &client.sent,
        &received,
        client.closed,
        case.end == End::KeepAlive,
    );
    notes.extend(note);
    if case.end == End::Closed && !client.closed {
        notes.push("the connection was expected to close".into());
    }
    Observed {
        upstream: upstream_conns,
        client: client_bytes,
        notes,
    }
}

/// What is wrong with `seen` against what `case` expects on `path`, as a readable report.
fn check(case: &Case, path: Path, seen: &Observed) -> Option<String> {
    let (want_up, want_client) = case.expected(path);
    let want_up: Vec<Vec<u8>> = want_up.iter().map(|c| canonical_upstream(c)).collect();
    let want_client = {
        let sent: Vec<u8> = case.client_bytes();
        canonical_client(&sent, &want_client, true, false).0
    };
    let mut report = String::new();
    let mut seen_client = seen.client.clone();
    if let Some((head, at_most)) = case.bounded_1xx {
        let relayed = (0..seen_client.len())
            .filter(|&i| seen_client[i..].starts_with(head))
            .count();
        if relayed > at_most {
            report.push_str(&format!(
                "{relayed} x {:?} relayed, more than {at_most}\n",
                show(head)
            ));
        }
        seen_client = replace(&seen_client, head, b"");
    }
    let upstream_ok = if case.upstream_prefix {
        // Cut short: each connection starts with what is expected and completes no request
        // beyond the expected ones.
        seen.upstream.len() == want_up.len()
            && seen.upstream.iter().zip(&want_up).all(|(seen, want)| {
                seen.starts_with(want)
                    && requests(seen).messages.len() <= requests(want).messages.len()
            })
    } else {
        seen.upstream == want_up
    };
    if !upstream_ok {
        let join = |conns: &[Vec<u8>]| -> Vec<u8> {
            conns
                .iter()
                .enumerate()
                .flat_map(|(i, c)| {
                    let mut v = format!("=== upstream connection {i} ===\r\n").into_bytes();
                    v.extend_from_slice(c);
                    v.extend_from_slice(b"\r\n");
                    v
                })
                .collect()
        };
        report.push_str(&format!(
            "upstream received (- expected, + actual):\n{}",
            diff(&join(&want_up), &join(&seen.upstream))
        ));
    }
    if seen_client != want_client {
        report.push_str(&format!(
            "client received (- expected, + actual):\n{}",
            diff(&want_client, &seen_client)
        ));
    }
    for n in &seen.notes {
        report.push_str(&format!("note: {n}\n"));
    }
    (!report.is_empty()).then_some(report)
}

/// Runs every case with every boundary it names on `path`; prints the tally and fails on any
/// failure that is not a known one.
async fn run_path(path: Path) {
    let subject = start_subject(path).await;
    let corpus = selected();
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runs = 0;
        let mut failures = Vec::new();
        let mut known = Vec::new();
        let mut unexpectedly_passing = Vec::new();
        for case in &corpus {
            let mut case_failed: Option<String> = None;
            let mut failed_boundaries = Vec::new();
            for boundary in &case.boundaries {
                runs += 1;
                let provider = subject.provider.clone();
                let seen = run_case(
                    case,
                    path,
                    boundary,
                    subject.tw.proxy,
                    subject.tw.admin,
                    &subject.upstream,
                    &move || provider.issued(),
                );
                if let Some(report) = check(case, path, &seen) {
                    failed_boundaries.push(boundary.name());
                    case_failed.get_or_insert(format!(
                        "--- {} [{}] on the {} path, boundary {}:\n{report}",
                        case.name,
                        case.covers,
                        path.name(),
                        boundary.name()
                    ));
                }
            }
            let case_failed = case_failed.map(|report| {
                format!(
                    "{report}(failed with boundaries: {})\n",
                    failed_boundaries.join(", ")
                )
            });
            match (case_failed, known_failing(case.name, path)) {
                (Some(report), None) => failures.push(report),
                (Some(report), Some(why)) => known.push(format!("{} ({why})\n{report}", case.name)),
                (None, Some(why)) => unexpectedly_passing.push(format!("{} ({why})", case.name)),
                (None, None) => {}
            }
        }
        (
            corpus.len(),
            runs,
            failures,
            known,
            unexpectedly_passing,
            subject,
        )
    })
    .await
    .unwrap();
    let (cases, runs, failures, known, passing, subject) = outcome;
    for f in &failures {
        println!("FAILED {f}");
    }
    for k in &known {
        // The first lines say enough; CONFORMANCE_CASE narrows a run down to show all.
        let lines: Vec<&str> = k.lines().collect();
        println!("KNOWN FAILING {}", lines[..lines.len().min(40)].join("\n"));
        if lines.len() > 40 {
            println!("    ... {} more lines", lines.len() - 40);
        }
    }
    for p in &passing {
        println!("KNOWN FAILING NOW PASSES (take it off KNOWN_FAILING): {p}");
    }
    println!(
        "conformance, {} path: {cases} cases, {runs} runs (case x boundary) in {:.1}s; {} failed, {} known failing, {} allowed path differences:",
        path.name(),
        started.elapsed().as_secs_f64(),
        failures.len(),
        known.len(),
        1 + cases::corpus()
            .iter()
            .filter(|c| c.full_path.is_some())
            .count()
    );
    println!("  - every case with a request body: {}", cases::TE_LAST);
    for c in cases::corpus() {
        if let Some(d) = &c.full_path {
            println!("  - {}: {}", c.name, d.reason);
        }
    }
    drop(subject);
    assert!(
        failures.is_empty() && passing.is_empty(),
        "{} cases failed, {} known failures now pass (see above)",
        failures.len(),
        passing.len()
    );
}

/// The corpus, or only the cases whose names contain `CONFORMANCE_CASE` when it is set.
fn selected() -> Vec<Case> {
    let only = std::env::var("CONFORMANCE_CASE").unwrap_or_default();
    cases::corpus()
        .into_iter()
        .filter(|c| c.name.contains(only.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_on_the_lean_path() {
    run_path(Path::Lean).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_on_the_full_path() {
    run_path(Path::Full).await;
}

// ---------------------------------------------------------------------------------------------
// nginx as the upstream

/// nginx as an origin: every request is logged with its body (read whole, through a second
/// server the first proxies to, which is what makes nginx keep `$request_body`), and answered
/// `200` with its method and target.
fn nginx_origin() -> Nginx {
    let sink = free_port();
    Nginx::start(&format!(
        r#"
  log_format conformance escape=json '$request_method $request_uri $status body=[$request_body] auth=[$http_authorization] cl=[$http_content_length] te=[$http_transfer_encoding] upgrade=[$http_upgrade]';
  server {{
    listen {{listen}};
    keepalive_requests 100000;
    client_body_buffer_size 16m;
    client_max_body_size 16m;
    access_log {{dir}}/origin.log conformance;
    location / {{ proxy_pass http://{sink}; }}
  }}
  server {{
    listen {sink};
    access_log off;
    location / {{ return 200 "$request_method $request_uri
"; }}
  }}
"#
    ))
}

/// What nginx must log for the requests `case` expects upstream: method, target, body and
/// the framing fields, the token normalised.
fn nginx_expected_log(case: &Case, path: Path) -> Vec<String> {
    let (up, _) = case.expected(path);
    up.iter()
        .flat_map(|conn| requests(conn).messages)
        .filter(|m| m.head.target() != SENTINEL_TARGET)
        .map(|m| {
            let field = |name: &str| {
                m.head
                    .values(name)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "{} {} 200 body=[{}] auth=[{}] cl=[{}] te=[{}] upgrade=[{}]",
                m.head.method(),
                m.head.target(),
                json_escape(&m.body),
                field("authorization"),
                field("content-length"),
                field("transfer-encoding"),
                field("upgrade"),
            )
        })
        .collect()
}

/// Bytes escaped as nginx's `escape=json` log format does.
fn json_escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\u{b:04x}")),
        }
    }
    out
}

/// The answers' statuses and bodies, one line each, and whether the connection stayed usable.
fn answers_summary(sent: &[u8], received: &[u8], eof: bool) -> Vec<String> {
    let t = responses(received, &methods_of(sent), eof);
    let mut out: Vec<String> = t
        .messages
        .iter()
        .map(|m| format!("{} body=[{}]", m.head.status(), json_escape(&m.body)))
        .collect();
    if !t.rest.is_empty() {
        out.push(format!("then, not an answer: {}", json_escape(&t.rest)));
    }
    out
}

/// Runs the cases marked for it with nginx as the upstream, on `path`: nginx must log exactly
/// the requests the case expects upstream, and the client must get nginx's answers to them.
async fn run_against_nginx_origin(path: Path) -> (usize, usize, Vec<String>, Vec<String>) {
    let nginx = nginx_origin();
    let provider = FakeProvider::start(3600, false, None).await;
    let fast = if path == Path::Lean { "true" } else { "false" };
    let tw = Tokenward::start_in_env(
        &format!("http://{}", nginx.addr),
        &oauth2_keys(&provider, ""),
        &[
            ("TOKENWARD_SERVER__HTTP1_FAST_PATH", fast),
            ("TOKENWARD_SERVER__THREADS", "1"),
        ],
    );
    tw.wait_ready().await;
    let corpus: Vec<Case> = selected()
        .into_iter()
        .filter(|c| c.nginx_upstream)
        .collect();
    let proxy = tw.proxy;
    tokio::task::spawn_blocking(move || {
        let (mut runs, mut failures, mut known) = (0, Vec::new(), Vec::new());
        for case in &corpus {
            let mut report = None;
            for boundary in &case.boundaries {
                runs += 1;
                let logged_before = nginx.log_lines("origin.log").len();
                let client = run_client(
                    proxy,
                    &case.client,
                    boundary,
                    case.end,
                    case.final_answers(path),
                    None,
                );
                let tokens = provider.issued();
                let want_log = nginx_expected_log(case, path);
                let sentinel = usize::from(case.end == End::KeepAlive);
                // nginx logs a request once its answer is sent: wait for the lines to be there.
                let deadline = Instant::now() + STEP_WAIT;
                let mut log = Vec::new();
                while Instant::now() < deadline {
                    log = nginx.log_lines("origin.log")[logged_before..].to_vec();
                    if log.len() >= want_log.len() + sentinel {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let log: Vec<String> = log
                    .iter()
                    .map(|l| {
                        let mut l = l.clone();
                        for t in &tokens {
                            l = l.replace(t.as_str(), "<TOKEN>");
                        }
                        l
                    })
                    .filter(|l| !l.starts_with(&format!("GET {SENTINEL_TARGET} ")))
                    .collect();
                let want_answers: Vec<String> = want_log
                    .iter()
                    .map(|l| {
                        let mut words = l.split(' ');
                        let (method, target) = (words.next().unwrap(), words.next().unwrap());
                        let body = if method == "HEAD" {
                            String::new()
                        } else {
                            format!("{method} {target}\\n")
                        };
                        format!("200 body=[{body}]")
                    })
                    .collect();
                let mut got_answers =
                    answers_summary(&client.sent, &client.received, client.closed);
                got_answers.retain(|a| !a.starts_with("100 "));
                if case.end == End::KeepAlive
                    && got_answers
                        .last()
                        .is_some_and(|a| a == "200 body=[GET /__end\\n]")
                {
                    got_answers.pop();
                }
                let mut problems = String::new();
                if log != want_log {
                    problems.push_str(&format!(
                        "nginx logged (- expected, + actual):\n{}",
                        diff(want_log.join("\n").as_bytes(), log.join("\n").as_bytes())
                    ));
                }
                if got_answers != want_answers {
                    problems.push_str(&format!(
                        "client answers (- expected, + actual):\n{}",
                        diff(
                            want_answers.join("\n").as_bytes(),
                            got_answers.join("\n").as_bytes()
                        )
                    ));
                }
                if case.end == End::Closed && !client.closed {
                    problems.push_str("the connection was expected to close\n");
                }
                for n in &client.notes {
                    problems.push_str(&format!("note: {n}\n"));
                }
                if !problems.is_empty() && report.is_none() {
                    report = Some(format!(
                        "--- {} with nginx as the upstream, {} path, boundary {}:\n{problems}",
                        case.name,
                        path.name(),
                        boundary.name()
                    ));
                }
            }
            match (report, known_failing(case.name, path)) {
                (Some(r), None) => failures.push(r),
                (Some(_), Some(why)) => known.push(format!("{} ({why})", case.name)),
                (None, _) => {}
            }
        }
        drop(tw);
        (corpus.len(), runs, failures, known)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_with_nginx_as_the_upstream() {
    let started = Instant::now();
    let mut all_failures = Vec::new();
    let mut summary = Vec::new();
    for path in [Path::Lean, Path::Full] {
        let (cases, runs, failures, known) = run_against_nginx_origin(path).await;
        for f in &failures {
            println!("FAILED {f}");
        }
        for k in &known {
            println!("KNOWN FAILING against nginx: {k}");
        }
        summary.push(format!(
            "{} path: {cases} cases, {runs} runs, {} failed, {} known failing",
            path.name(),
            failures.len(),
            known.len()
        ));
        all_failures.extend(failures);
    }
    println!(
        "conformance with nginx as the upstream, in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    assert!(
        all_failures.is_empty(),
        "{} cases failed against nginx (see above)",
        all_failures.len()
    );
}
