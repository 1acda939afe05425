//! `--http` on a namespace LAN with the real counterparts: a Prometheus server that finds
//! every host through one daemon's `/sd` and scrapes their `/metrics`, and the status
//! page in headless Chromium, updated live by the event stream.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Lan, binary, eventually, tool_available};

const HTTP_PORT: u16 = 9464;

/// A daemon (named `h<i>`) on host `i` serving HTTP on its address.
fn http_daemon(lan: &Lan, i: usize) -> u32 {
    let http = SocketAddr::new(lan.ip(i).into(), HTTP_PORT).to_string();
    lan.daemon(i, &["--http", &http])
}

/// `GET path` on `addr` from host `i`: the status code and the body.
fn get(lan: &Lan, i: usize, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    lan.within(i, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        // To the end, or (a server that keeps the connection) Content-Length bytes.
        let mut bytes = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) if !bytes.is_empty() => break,
                Err(_) => return None,
            };
            bytes.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&bytes);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                });
                if length.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
        let response = String::from_utf8_lossy(&bytes).into_owned();
        let (head, body) = response.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Some((code, body))
    })
}

/// The body of a chunked response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn get_json(lan: &Lan, i: usize, addr: SocketAddr, path: &str) -> Option<Value> {
    let (code, body) = get(lan, i, addr, path)?;
    (code == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

#[test]
fn the_endpoints_answer_and_say_what_is_wrong() {
    let Some(lan) = Lan::new("http", 140, 3) else {
        return;
    };
    for i in 0..3 {
        http_daemon(&lan, i);
    }
    let addr = SocketAddr::new(lan.ip(0).into(), HTTP_PORT);
    let sd_has_all =
        || get_json(&lan, 1, addr, "/sd").and_then(|v| v.as_array().map(|a| a.len())) == Some(3);
    assert!(
        eventually(Duration::from_secs(5), sd_has_all),
        "/sd lists every host"
    );
    let sd = get_json(&lan, 1, addr, "/sd").unwrap_or_default();
    let h1 = sd
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["labels"]["localnet_name"] == "h1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(h1["targets"][0], format!("{}:{HTTP_PORT}", lan.ip(1)));
    assert_eq!(h1["labels"]["localnet_role"], "daemon");
    let (code, metrics) = get(&lan, 1, addr, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    for needle in [
        "localnet_build_info{",
        "localnet_peers{state=\"alive\"} 2",
        "localnet_datagrams_received_total ",
        "localnet_datagrams_dropped_total{reason=\"auth\"} 0",
        "localnet_messages_sent_total{kind=\"heartbeat\"}",
        "localnet_sent_bytes_total ",
        "localnet_peer_events_total{event=\"joined\"}",
        "localnet_control_clients 0",
        "# EOF",
    ] {
        assert!(metrics.contains(needle), "no {needle:?} in {metrics}");
    }
    let peers = get_json(&lan, 1, addr, "/peers").unwrap_or_default();
    assert_eq!(peers.as_array().map(Vec::len), Some(2));
    let (code, page) = get(&lan, 1, addr, "/").expect("page");
    assert_eq!(code, 200);
    assert!(page.contains("new EventSource(\"/events\")"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing fetched from elsewhere"
    );
    let (code, body) = get(&lan, 1, addr, "/nothing").expect("404");
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
    // A busy address is an error at start that names it.
    let http = format!("{}:{HTTP_PORT}", lan.ip(0));
    let sock = lan.dir().join("second.sock");
    let out = lan.run(
        0,
        &binary(),
        &[
            "daemon",
            "--control",
            sock.to_str().unwrap(),
            "--http",
            &http,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen for HTTP on {http}")),
        "{stderr}"
    );
}

#[test]
fn prometheus_finds_every_host_through_sd_and_marks_a_killed_one_down() {
    let Some(lan) = Lan::new("prom", 141, 6) else {
        return;
    };
    if !tool_available("prometheus", "prometheus") {
        return;
    }
    let daemons: Vec<u32> = (1..=5).map(|i| http_daemon(&lan, i)).collect();
    let sd_host = SocketAddr::new(lan.ip(1).into(), HTTP_PORT);
    let listed =
        || get_json(&lan, 0, sd_host, "/sd").and_then(|v| v.as_array().map(Vec::len)) == Some(5);
    assert!(
        eventually(Duration::from_secs(10), listed),
        "h1's /sd lists the 5 hosts"
    );
    let dir = lan.dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 800ms\nscrape_configs:\n  \
             - job_name: localnet\n    http_sd_configs:\n      - url: http://{sd_host}/sd\n        \
             refresh_interval: 10s\n"
        ),
    )
    .expect("prometheus config");
    let api = SocketAddr::new(lan.ip(0).into(), 9090);
    let listen = format!("--web.listen-address={api}");
    let config_arg = format!("--config.file={}", config.display());
    let data_arg = format!("--storage.tsdb.path={}", dir.join("data").display());
    lan.spawn(
        0,
        "prometheus",
        std::path::Path::new("prometheus"),
        &[&config_arg, &data_arg, &listen],
    );
    let targets = || -> Vec<(String, String)> {
        get_json(&lan, 0, api, "/api/v1/targets")
            .and_then(|v| v["data"]["activeTargets"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|t| {
                let name = t["labels"]["localnet_name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let health = t["health"].as_str().unwrap_or("").to_string();
                (name, health)
            })
            .collect()
    };
    let all_up = || {
        let t = targets();
        t.len() == 5 && t.iter().all(|(_, h)| h == "up")
    };
    assert!(
        eventually(Duration::from_secs(30), all_up),
        "every host an up target: {:?}\n{}",
        targets(),
        lan.log("prometheus")
    );
    // Each host's localnet_peers{state="alive"} is 4 (the other hosts), as scraped.
    let query = "/api/v1/query?query=localnet_peers%7Bstate%3D%22alive%22%7D";
    let alive_series = || -> Vec<(String, String)> {
        get_json(&lan, 0, api, query)
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|s| {
                let name = s["metric"]["localnet_name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let value = s["value"][1].as_str().unwrap_or("").to_string();
                (name, value)
            })
            .collect()
    };
    let right = || {
        let mut s = alive_series();
        s.sort();
        s == (1..=5)
            .map(|i| (format!("h{i}"), "4".to_string()))
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(10), right),
        "{:?}",
        alive_series()
    );
    // kill -9 of h3: Prometheus's next scrape of it fails.
    lan.signal(daemons[2], libc::SIGKILL);
    let killed_at = Instant::now();
    let down = || targets().iter().any(|(n, h)| n == "h3" && h == "down");
    assert!(eventually(Duration::from_secs(10), down), "{:?}", targets());
    eprintln!(
        "FIGURE prometheus marked h3 down {:.1} s after kill -9",
        killed_at.elapsed().as_secs_f64()
    );
}

/// A Chrome DevTools Protocol session with a page (its websocket), for the test.
struct DevTools {
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl DevTools {
    /// The first page of the Chromium listening for DevTools on `port` of host `i`.
    fn connect(lan: &Lan, i: usize, port: u16) -> Option<DevTools> {
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        let pages = get_json(lan, i, local, "/json/list")?;
        let url = pages.as_array()?.iter().find(|p| p["type"] == "page")?["webSocketDebuggerUrl"]
            .as_str()?
            .to_string();
        let stream = lan.within(i, move || TcpStream::connect(local).ok())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let (socket, _) = tungstenite::client(url.as_str(), stream).ok()?;
        Some(DevTools { socket, next_id: 1 })
    }

    /// Sends a command and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Option<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = serde_json::json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(tungstenite::Message::Text(request.to_string().into()))
            .ok()?;
        loop {
            let message = self.socket.read().ok()?;
            let Ok(text) = message.to_text() else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if value["id"] == id {
                return Some(value["result"].clone());
            }
        }
    }

    /// The page's peer rows as (name, state).
    fn rows(&mut self) -> Vec<(String, String)> {
        let expression = "JSON.stringify([...document.querySelectorAll('tr[data-name]')]\
                          .map(r => [r.dataset.name, r.dataset.state]))";
        let result = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expression, "returnByValue": true }),
        );
        result
            .and_then(|r| r["result"]["value"].as_str().map(str::to_string))
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }
}

#[test]
fn the_status_page_in_chromium_shows_a_killed_host_failed_within_two_seconds() {
    let Some(lan) = Lan::new("page", 142, 7) else {
        return;
    };
    if !tool_available("chromium", "chromium") {
        return;
    }
    // The page of h1's daemon; four other hosts, and h6 to kill.
    let daemons: Vec<u32> = (1..=6).map(|i| http_daemon(&lan, i)).collect();
    let page = format!("http://{}:{HTTP_PORT}/", lan.ip(1));
    let profile = lan.dir().join("chromium");
    let profile_arg = format!("--user-data-dir={}", profile.display());
    // Nothing but the page: no name is resolved, no background traffic.
    let resolver_rules = format!(
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {}",
        lan.ip(1)
    );
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--metrics-recording-only",
        &resolver_rules,
        "--remote-debugging-port=9222",
        "--window-size=800,600",
        &profile_arg,
        &page,
    ];
    lan.spawn(0, "chromium", std::path::Path::new("chromium"), &args);
    let mut devtools = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            devtools = DevTools::connect(&lan, 0, 9222);
            devtools.is_some()
        }),
        "chromium's DevTools did not answer: {}",
        lan.log("chromium")
    );
    let mut devtools = devtools.expect("devtools");
    let all_alive = |d: &mut DevTools| {
        let rows = d.rows();
        rows.len() == 5 && rows.iter().all(|(_, s)| s == "alive")
    };
    let start = Instant::now();
    while !all_alive(&mut devtools) {
        if start.elapsed() > Duration::from_secs(20) {
            let expression = "location.href + ' ' + document.body.innerText";
            let params = serde_json::json!({ "expression": expression, "returnByValue": true });
            let page = devtools.call("Runtime.evaluate", params);
            panic!("rows: {:?}; the page: {page:?}", devtools.rows());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut names: Vec<String> = devtools.rows().into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["h2", "h3", "h4", "h5", "h6"]);
    lan.signal(daemons[5], libc::SIGKILL);
    let killed_at = Instant::now();
    let failed = loop {
        let rows = devtools.rows();
        if rows.iter().any(|(n, s)| n == "h6" && s == "failed") {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "rows: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "FIGURE status page shows h6 failed {:.2} s after kill -9",
        failed.as_secs_f64()
    );
    assert!(
        failed <= Duration::from_secs(2),
        "failed on the page after {failed:?}"
    );
    // The others are still alive on the page, and the page was never reloaded: the
    // row came from the event stream.
    let rows = devtools.rows();
    assert_eq!(
        rows.iter().filter(|(_, s)| s == "alive").count(),
        4,
        "{rows:?}"
    );
    let shot = devtools
        .call(
            "Page.captureScreenshot",
            serde_json::json!({ "format": "png" }),
        )
        .and_then(|r| r["data"].as_str().map(str::to_string))
        .and_then(|b64| localnet::protocol::base64_decode(&b64))
        .expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &shot).expect("write screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("screenshot: {}", path.display());
}

#[test]
fn a_slave_serves_its_jobs_and_their_counters() {
    let Some(lan) = Lan::new("shttp", 143, 2) else {
        return;
    };
    let key = lan.key("k");
    let http = SocketAddr::new(lan.ip(1).into(), HTTP_PORT);
    let http_arg = http.to_string();
    support::slave(&lan, 1, &["--key-file", &key, "--http", &http_arg]);
    let up = || get(&lan, 0, http, "/jobs").is_some_and(|(code, _)| code == 200);
    assert!(eventually(Duration::from_secs(5), up), "{}", lan.log("s1"));
    let bin = binary();
    let args = [
        "master",
        "--interface",
        "eth0",
        "--key-file",
        &key,
        "--slaves",
        "1",
        "--wait",
        "5s",
        "--",
        "sh",
        "-c",
        "echo one; echo two; sleep 1",
    ];
    let master = lan.spawn(0, "master", &bin, &args);
    let running = || {
        get_json(&lan, 0, http, "/jobs")
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|jobs| {
                jobs.len() == 1 && jobs[0]["command"] == "sh -c echo one; echo two; sleep 1"
            })
    };
    assert!(
        eventually(Duration::from_secs(5), running),
        "the job is listed while it runs"
    );
    assert_eq!(
        lan.wait(master, Duration::from_secs(10)),
        Some(0),
        "{}",
        lan.log("master")
    );
    let metrics = get(&lan, 0, http, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    for needle in [
        "role=\"slave\"",
        "localnet_jobs_started_total 1",
        "localnet_jobs_finished_total{outcome=\"succeeded\"} 1",
        "localnet_jobs_finished_total{outcome=\"failed\"} 0",
        "localnet_job_output_bytes_total 8",
        "localnet_job_output_lines_total 2",
        "localnet_jobs_running 0",
        "localnet_log_lines_forwarded_total 0",
    ] {
        assert!(metrics.contains(needle), "no {needle:?} in {metrics}");
    }
    let jobs = get_json(&lan, 0, http, "/jobs").unwrap_or_default();
    assert_eq!(jobs, serde_json::json!([]));
}
