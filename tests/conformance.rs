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
        "post-chunked",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "answer-chunked",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "chunked-trailers-request",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "chunked-trailers-answer",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "chunk-crlf-late",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "chunk-fills-64k-read",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "answer-chunk-fills-64k-read",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "answer-content-length-and-chunked",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "transfer-encoding-and-content-length",
        Some(Path::Lean),
        "issue 18 defect 1: an empty body read is written as the last chunk",
    ),
    (
        "early-401-during-upload",
        Some(Path::Lean),
        "issue 18 defect 2: an early final answer during an upload becomes 502",
    ),
    (
        "early-413-during-upload",
        Some(Path::Lean),
        "issue 18 defect 2: an early final answer during an upload becomes 502",
    ),
    (
        "early-401-during-upload",
        Some(Path::Full),
        "issue 18 defect 7: the upstream's Connection field reaches the client",
    ),
    (
        "early-413-during-upload",
        Some(Path::Full),
        "issue 18 defect 7: the upstream's Connection field reaches the client",
    ),
    (
        "websocket-accepted",
        Some(Path::Lean),
        "issue 18 defect 3: bytes sent with the upgrade head are lost",
    ),
    (
        "websocket-accepted",
        Some(Path::Full),
        "issue 18 defect 3: bytes that follow the upgrade head in a later read, before the 101, fail the upgrade with a 400 ConnectError (boundaries byte-by-byte and crlf)",
    ),
    (
        "websocket-refused",
        Some(Path::Lean),
        "issue 18 defect 3: a refused upgrade says keep-alive and closes",
    ),
    (
        "h2c-upgrade",
        Some(Path::Lean),
        "issue 18 defect 3: an Upgrade: h2c GET says keep-alive and closes",
    ),
    (
        "connect",
        Some(Path::Lean),
        "issue 18 defect 4: CONNECT is forwarded upstream with the token",
    ),
    (
        "expect-100-upstream-fails",
        Some(Path::Lean),
        "issue 18 defect 5: after its own 100, an upstream failure gives the client EOF",
    ),
    (
        "expect-100-http10",
        Some(Path::Lean),
        "issue 18 defect 5: an HTTP/1.0 client gets a 100",
    ),
    (
        "expect-100-http10",
        Some(Path::Full),
        "issue 18 defect 10: a 1xx is relayed to an HTTP/1.0 client",
    ),
    (
        "websocket-with-body",
        Some(Path::Full),
        "issue 18 defect 6: a WebSocket upgrade with a body is an upgrade on one path, a plain request on the other",
    ),
    (
        "connection-10-options",
        Some(Path::Full),
        "issue 18 defect 6: the full path refuses more than 9 Connection options",
    ),
    (
        "connection-33-options",
        None,
        "issue 18 defect 11: an error answer says keep-alive and the connection is closed",
    ),
    (
        "hop-by-hop-answer",
        None,
        "issue 18 defect 7: hop-by-hop fields in answers reach the client",
    ),
    (
        "unsolicited-101",
        Some(Path::Lean),
        "issue 18 defect 11: an error answer says keep-alive and the connection is closed",
    ),
    (
        "unsolicited-101",
        Some(Path::Full),
        "issue 18 defect 9: a 101 nobody asked for is relayed and tunnelled",
    ),
    (
        "1xx-flood",
        None,
        "issue 18 defect 10: 1xx answers are relayed without bound",
    ),
    (
        "1xx-to-http10",
        None,
        "issue 18 defect 10: 1xx answers are relayed to HTTP/1.0 clients",
    ),
    (
        "upstream-gone-502",
        None,
        "issue 18 defect 11: an error answer says keep-alive and the connection is closed",
    ),
    (
        "chunk-extension-bare-lf",
        None,
        "issue 18 defect 12: a bare LF in a chunk extension is accepted",
    ),
    (
        "content-length-list",
        None,
        "issue 18 defect 12: `Content-Length: 5, 5` is forwarded verbatim",
    ),
    (
        "admin-http10",
        None,
        "issue 18 defect 13: the admin listener keeps an HTTP/1.0 connection without keep-alive open",
    ),
    (
        "pipelined-three",
        None,
        "NOT IN ISSUE 18's LIST: after the first of pipelined requests the connection closes, its answer having said keep-alive; the others go unanswered",
    ),
    (
        "http10-chunked-answer",
        None,
        "NOT IN ISSUE 18's LIST: an HTTP/1.0 client gets a chunked answer (RFC 9112 §6.1 forbids Transfer-Encoding in an answer to HTTP/1.0)",
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
    if seen.client != want_client {
        report.push_str(&format!(
            "client received (- expected, + actual):\n{}",
            diff(&want_client, &seen.client)
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

#[allow(unused)]
fn unused(_: Nginx, _: Duration) {}
