//! The EC2 instance metadata service (IMDSv2), asked once, briefly, at open time whether this
//! machine has an IAM role: a job on an EC2 instance with an instance profile then reads S3 with
//! the role's rotating credentials (object_store fetches and renews them), and a machine with
//! neither keys nor a role is still refused at once with a message saying what to set, instead
//! of failing its first request after object_store's retries.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the service answers on EC2.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

/// Longest wait for each of the probe's connections and answers: the service answers in
/// milliseconds on EC2; elsewhere the link-local address usually does not answer at all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest time one question to the service may take in all.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Largest answer read (a role name, a token).
const MAX_ANSWER: u64 = 64 << 10;

/// A role found at an endpoint stays found: stores are opened again at every catalog refresh,
/// and object_store renews the role's credentials itself.
static FOUND: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The name of the IAM role the instance metadata service at `endpoint` (`http://host[:port]`)
/// serves credentials for, or why there is none to use (not on EC2, no role attached, IMDSv2
/// refused). With `imdsv1_fallback`, a refused session token is not an error (IMDSv1).
pub fn instance_role(endpoint: &str, imdsv1_fallback: bool) -> Result<String, String> {
    let host = host_of(endpoint).ok_or_else(|| {
        format!(
            "metadata endpoint {}: expected http://host[:port]",
            crate::location::redact_url(endpoint)
        )
    })?;
    let endpoint = normalized(host);
    let known = FOUND.lock().ok().and_then(|found| {
        found
            .iter()
            .find(|(e, _)| *e == endpoint)
            .map(|(_, role)| role.clone())
    });
    if let Some(role) = known {
        return Ok(role);
    }
    // One more try for a service that did not answer in time the first time (not for an
    // answer: no role, a refused token).
    let role = ask_role(host, &endpoint, imdsv1_fallback)
        .or_else(|_| ask_role(host, &endpoint, imdsv1_fallback))
        .and_then(|answer| answer)?;
    if let Ok(mut found) = FOUND.lock() {
        found.push((endpoint, role.clone()));
    }
    Ok(role)
}

/// The endpoint as object_store is given it: `http://host[:port]`, no trailing slash.
pub fn normalized(host: &str) -> String {
    format!("http://{host}")
}

/// The role, or why there is none (`Ok(Err(why))`: the service answered); `Err(why)`: the
/// service did not answer.
fn ask_role(
    host: &str,
    endpoint: &str,
    imdsv1_fallback: bool,
) -> Result<Result<String, String>, String> {
    let token = match request(
        host,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
    )? {
        (200, token) if is_header_value(token.trim()) => Some(token.trim().to_string()),
        (403, _) if imdsv1_fallback => None,
        (status, _) => {
            return Ok(Err(format!(
                "the instance metadata service at {endpoint} refused a session token (HTTP {status}); IMDSv2 is required (AWS_IMDSV1_FALLBACK=true allows IMDSv1; other clouds' metadata services do not serve AWS credentials)"
            )));
        }
    };
    let headers: Vec<(&str, &str)> = token
        .as_deref()
        .map(|t| ("X-aws-ec2-metadata-token", t))
        .into_iter()
        .collect();
    Ok(
        match request(
            host,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &headers,
        )? {
            (200, roles) => roles
                .lines()
                .map(str::trim)
                .find(|r| !r.is_empty())
                .filter(|r| is_header_value(r))
                .map(str::to_string)
                .ok_or_else(|| {
                    format!("the instance metadata service at {endpoint} lists no IAM role")
                }),
            (404, _) => Err(format!(
                "this machine has no IAM role attached (the instance metadata service at {endpoint} has no security credentials)"
            )),
            (status, _) => Err(format!(
                "the instance metadata service at {endpoint} answered HTTP {status} for its IAM role"
            )),
        },
    )
}

/// Visible ASCII only: a token or role name that goes into a header or a path.
fn is_header_value(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Why `endpoint` cannot be the metadata service's address, if it cannot: the service speaks
/// plain HTTP, so it must be `http://host[:port]` (no path, user info or query).
pub fn metadata_endpoint_problem(endpoint: &str) -> Option<&'static str> {
    host_of(endpoint).is_none().then_some(
        "must be http://host[:port] (the service speaks plain HTTP; no path, user info or query)",
    )
}

/// The `host[:port]` of an `http://host[:port]` endpoint.
pub fn host_of(endpoint: &str) -> Option<&str> {
    endpoint
        .strip_prefix("http://")
        .map(|h| h.trim_end_matches('/'))
        .filter(|h| {
            !h.is_empty() && !h.contains(['/', '@', '?', '#']) && !h.contains(char::is_whitespace)
        })
}

/// One HTTP/1.1 request with an empty body: (status, body), all within [`PROBE_TIMEOUT`] per
/// connection and [`PROBE_DEADLINE`] in all. Errors say the service is not there.
fn request(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "no instance metadata service at http://{host} ({e}; in a container, the instance's metadata hop limit may need to be 2)"
        )
    };
    // `[v6]` and `host` without a port: the HTTP port.
    let with_port = if host.ends_with(']') || !host.contains(':') {
        format!("{host}:80")
    } else {
        host.to_string()
    };
    let deadline = Instant::now() + PROBE_DEADLINE;
    let addrs: Vec<_> = with_port
        .to_socket_addrs()
        .map_err(|e| unreachable(&e))?
        .collect();
    let mut last = String::from("no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let mut stream = stream.ok_or_else(|| unreachable(&last))?;
    stream
        .set_write_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| unreachable(&e))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| unreachable(&e))?;
    // Read until the answer is complete (headers, then `Content-Length` bytes) or closed.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(done) = parse_answer(&answer, false) {
            return done.ok_or_else(|| unreachable(&"an answer this client does not read"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || answer.len() as u64 > MAX_ANSWER {
            return Err(unreachable(&"no complete answer in time"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| unreachable(&e))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return parse_answer(&answer, true)
                    .flatten()
                    .ok_or_else(|| unreachable(&"not an HTTP answer"));
            }
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(unreachable(&e)),
        }
    }
}

/// (status, body) of an HTTP/1.1 answer: `None` while incomplete (unless `closed`: then
/// whatever arrived is the body when no `Content-Length` was given); `Some(None)` for one this
/// client does not read (chunked).
fn parse_answer(answer: &[u8], closed: bool) -> Option<Option<(u16, String)>> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let body = &answer[end + 4..];
    let mut lines = head.lines();
    let Some(status) = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
    else {
        return Some(None);
    };
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") {
            return Some(None);
        }
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let body = match length {
        Some(n) if body.len() >= n => &body[..n],
        Some(_) if !closed => return None,
        Some(_) => return Some(None),
        None if !closed => return None,
        None => body,
    };
    Some(Some((status, String::from_utf8_lossy(body).into_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let ok = |a: &[u8], closed| parse_answer(a, closed);
        assert_eq!(
            ok(
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nrolextra",
                false
            ),
            Some(Some((200, "role".into())))
        );
        assert_eq!(
            ok(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nro", false),
            None
        );
        assert_eq!(
            ok(b"HTTP/1.0 404 Not Found\r\n\r\n", true),
            Some(Some((404, String::new())))
        );
        assert_eq!(ok(b"HTTP/1.0 404 Not Found\r\n\r\n", false), None);
        assert_eq!(
            ok(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nrole\r\n",
                false
            ),
            Some(None)
        );
        assert_eq!(ok(b"SSH-2.0-OpenSSH\r\n\r\n", true), Some(None));
        assert!(
            is_header_value("AQAEA-token_=") && !is_header_value("a\r\nb") && !is_header_value("")
        );
    }

    #[test]
    fn endpoints_are_plain_http_hosts() {
        for bad in [
            "https://169.254.169.254",
            "http://u:p@h",
            "http:///x",
            "169.254.169.254",
        ] {
            assert!(
                instance_role(bad, false)
                    .unwrap_err()
                    .contains("expected http://"),
                "{bad}"
            );
        }
    }

    /// A port nobody listens on: refused at once, saying there is no service.
    #[test]
    fn no_service_is_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = instance_role(&format!("http://127.0.0.1:{port}"), false).unwrap_err();
        assert!(err.contains("no instance metadata service"), "{err}");
    }

    /// An answer (here: no session token) is not asked again; only silence is.
    #[test]
    fn an_answer_is_not_asked_twice() {
        use std::io::{Read, Write};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (asked, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let server = {
            let (asked, done) = (Arc::clone(&asked), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    asked.fetch_add(1, Ordering::SeqCst);
                    conn.set_nonblocking(false).unwrap();
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
                }
            })
        };
        let err = instance_role(&format!("http://127.0.0.1:{port}"), false).unwrap_err();
        done.store(true, Ordering::SeqCst);
        server.join().unwrap();
        assert!(err.contains("refused a session token (HTTP 403)"), "{err}");
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }
}
