//! The EC2 instance metadata service (IMDSv2), asked once, briefly, at open time whether this
//! machine has an IAM role: a job on an EC2 instance with an instance profile then reads S3 with
//! the role's rotating credentials (object_store fetches and renews them), and a machine with
//! neither keys nor a role is still refused at once with a message saying what to set, instead
//! of failing its first request after object_store's retries.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where the service answers on EC2.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

/// Longest wait for each of the probe's connections and answers: the service answers in
/// milliseconds on EC2; elsewhere the link-local address usually does not answer at all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest answer read (a role name, a token).
const MAX_ANSWER: u64 = 64 << 10;

/// The name of the IAM role the instance metadata service at `endpoint` (`http://host[:port]`)
/// serves credentials for, or why there is none to use (not on EC2, no role attached, IMDSv2
/// refused).
pub fn instance_role(endpoint: &str) -> Result<String, String> {
    let host = host_of(endpoint).ok_or_else(|| {
        format!(
            "metadata endpoint {}: expected http://host[:port]",
            crate::location::redact_url(endpoint)
        )
    })?;
    let token = match request(
        host,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
    )? {
        (200, token) if !token.trim().is_empty() => token.trim().to_string(),
        (status, _) => {
            return Err(format!(
                "the instance metadata service at {endpoint} refused a session token (HTTP {status}); IMDSv2 is required"
            ));
        }
    };
    match request(
        host,
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &[("X-aws-ec2-metadata-token", &token)],
    )? {
        (200, roles) => roles
            .lines()
            .map(str::trim)
            .find(|r| !r.is_empty())
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
    }
}

/// Why `endpoint` cannot be the metadata service's address, if it cannot: the service speaks
/// plain HTTP, so it must be `http://host[:port]` (no path, user info or query).
pub fn metadata_endpoint_problem(endpoint: &str) -> Option<&'static str> {
    host_of(endpoint).is_none().then_some(
        "must be http://host[:port] (the service speaks plain HTTP; no path, user info or query)",
    )
}

/// The `host[:port]` of an `http://host[:port]` endpoint.
fn host_of(endpoint: &str) -> Option<&str> {
    endpoint
        .strip_prefix("http://")
        .map(|h| h.trim_end_matches('/'))
        .filter(|h| {
            !h.is_empty() && !h.contains(['/', '@', '?', '#']) && !h.contains(char::is_whitespace)
        })
}

/// One HTTP/1.1 request with an empty body: (status, body). Errors say the service is not
/// there.
fn request(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let unreachable =
        |e: &dyn std::fmt::Display| format!("no instance metadata service at http://{host} ({e})");
    let with_port = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| unreachable(&e))?
        .next()
        .ok_or_else(|| unreachable(&"no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| unreachable(&e))?;
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(PROBE_TIMEOUT)))
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
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(|e| unreachable(&e))?;
    parse_answer(&answer).ok_or_else(|| unreachable(&"not an HTTP answer"))
}

/// (status, body) of an HTTP/1.1 answer read to its end (the body cut to its
/// `Content-Length` where there is one).
fn parse_answer(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let length = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let body = match length {
        Some(n) => body.get(..n.min(body.len()))?,
        None => body,
    };
    Some((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nrolextra"),
            Some((200, "role".into()))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.0 404 Not Found\r\n\r\n"),
            Some((404, String::new()))
        );
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH\r\n"), None);
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
                instance_role(bad).unwrap_err().contains("expected http://"),
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
        let err = instance_role(&format!("http://127.0.0.1:{port}")).unwrap_err();
        assert!(err.contains("no instance metadata service"), "{err}");
    }
}
