//! Fuzzing on stable Rust with proptest: random and mutated inputs into every parser that
//! faces the network or a local client, checking that nothing panics and that nothing
//! grows without bound.
//!
//! - discovery datagrams into [`Discovery::handle_datagram`] (and the shared-decoding
//!   path, [`Discovery::handle_decoded`]) of long-lived cores, open and keyed;
//! - master–slave session frames into the session decoder, and byte streams into the
//!   transport's connection setup and frame reader over loopback TCP;
//! - lines into the control socket's request parser.
//!
//! 10 000 cases per test by default; `FUZZ_CASES` (or `PROPTEST_CASES`) sets another
//! number, e.g. `FUZZ_CASES=10000000 cargo test --release --test fuzz datagrams` (each
//! test prints `FIGURE fuzz_<name>_cases=N cases_per_s=R`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Instant;

use localnet::ClusterKey;
use localnet::control;
use localnet::discovery::wire::{self, Auth, Message, NodeRecord};
use localnet::discovery::{
    Config, Decoded, Discovery, Footprint, LocalNode, MAX_REJECTIONS, Millis,
};
use localnet::protocol::{Frame, JobExit, Stream};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use uuid::Uuid;

fn cases() -> u32 {
    ["FUZZ_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(10_000)
}

/// Runs `test` on `cases()` inputs of `strategy`; prints the rate.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let cases = cases();
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, test);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "FIGURE fuzz_{name}_cases={cases} seconds={secs:.1} cases_per_s={:.0}",
        f64::from(cases) / secs
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

const T0: Millis = 1_800_000_000_000;
const MAX_PEERS: usize = 16;

fn the_key() -> ClusterKey {
    ClusterKey::from_bytes([7; 32])
}

fn node(key: Option<ClusterKey>) -> Discovery {
    let me = LocalNode {
        id: Uuid::from_u128(1),
        name: "me".into(),
        incarnation: 1,
        addr: "0.0.0.0:7000".parse().unwrap(),
        role: "daemon".into(),
        tags: BTreeMap::new(),
    };
    let cfg = Config {
        max_peers: MAX_PEERS,
        ..Config::default()
    };
    let mut n = Discovery::new(cfg, me, key, 1, T0).unwrap();
    n.start(T0);
    n
}

/// A long-lived core and its clock.
struct Subject {
    core: Discovery,
    now: Millis,
    fed: u64,
}

thread_local! {
    static SUBJECTS: RefCell<Vec<Subject>> = RefCell::new(vec![
        Subject { core: node(None), now: T0, fed: 0 },
        Subject { core: node(Some(the_key())), now: T0, fed: 0 },
    ]);
}

/// Every internal collection stays within its bound, whatever was fed.
fn check_bounds(f: &Footprint) -> Result<(), TestCaseError> {
    prop_assert!(f.peers <= MAX_PEERS, "{f:?}");
    prop_assert!(f.limiter <= 2 * MAX_PEERS, "{f:?}");
    prop_assert!(f.replay <= 2 * MAX_PEERS, "{f:?}");
    prop_assert!(f.tombstones <= 2 * MAX_PEERS, "{f:?}");
    prop_assert!(f.rejections <= MAX_REJECTIONS, "{f:?}");
    prop_assert!(f.timers <= 4 * MAX_PEERS + 64, "{f:?}");
    prop_assert!(f.record_requests <= 256, "{f:?}");
    prop_assert!(f.transmits == 0 && f.events == 0, "{f:?}");
    Ok(())
}

fn record() -> impl Strategy<Value = NodeRecord> {
    (
        0u128..64,
        "[a-z]{1,12}",
        any::<u64>(),
        prop_oneof![Just(200u64), 1u64..10_000, any::<u64>()],
        prop_oneof![Just(1u64), 1u64..100, Just(u64::MAX)],
        prop::collection::btree_map("[a-z]{1,4}", "[a-z0-9]{0,6}", 0..3),
        any::<u16>(),
        prop_oneof![0u64..4, any::<u64>()],
    )
        .prop_map(
            |(id, name, inc, ivl, ttl_factor, tags, port, seq)| NodeRecord {
                id: Uuid::from_u128(id + 2),
                name,
                incarnation: inc % 8,
                seq,
                addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                role: "daemon".into(),
                tags,
                interval_ms: ivl,
                ttl_ms: ivl.saturating_mul(ttl_factor),
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (0u128..64, 0u64..8, prop_oneof![0u64..4, any::<u64>()]).prop_map(
            |(id, incarnation, seq)| Message::Heartbeat {
                id: Uuid::from_u128(id + 2),
                incarnation,
                seq
            }
        ),
        // Heartbeats of ever new members: each asks for a record (bounded).
        (any::<u128>(), any::<u64>()).prop_map(|(id, incarnation)| Message::Heartbeat {
            id: Uuid::from_u128(id),
            incarnation,
            seq: 1
        }),
        (record(), prop_oneof![0u64..100, any::<u64>()]).prop_map(|(node, reply_window_ms)| {
            Message::Announce {
                node,
                reply_window_ms,
            }
        }),
        (0u128..64, prop::option::of(record()), any::<bool>()).prop_map(|(from, node, direct)| {
            let from = Uuid::from_u128(from + 2);
            let node = node.map(|mut n| {
                n.id = from;
                n
            });
            Message::Probe { from, node, direct }
        }),
        (0u128..64, 0u128..4).prop_map(|(from, target)| Message::Ping {
            from: Uuid::from_u128(from + 2),
            target: Uuid::from_u128(target),
        }),
        (0u128..64, 0u64..8).prop_map(|(id, inc)| Message::Goodbye {
            id: Uuid::from_u128(id + 2),
            incarnation: inc
        }),
    ]
}

/// A byte-level change to a datagram.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                prop::sample::select(vec![0x00u8, 0x01, 0x02, 0x7f, 0x80, 0xff]),
                any::<u8>()
            ]
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(i, b) if !bytes.is_empty() => bytes[i % len] ^= b,
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
            _ => {}
        }
    }
}

/// How a datagram is signed.
#[derive(Clone, Debug)]
enum Signing {
    Open,
    /// With the keyed subject's key, its counter this far (ms) from the subject's clock.
    Ours(i64),
    Other,
}

/// What a fuzz input sends.
#[derive(Clone, Debug)]
enum Payload {
    /// These bytes.
    Raw(Vec<u8>),
    /// This message, encoded and signed at feeding time (against the subject's clock),
    /// then mutated.
    Message(Message, Signing, Vec<Mutation>),
}

/// One fuzz input: a datagram, where it comes from and how much time passed before it.
#[derive(Clone, Debug)]
struct Input {
    payload: Payload,
    source: SocketAddr,
    advance_ms: u64,
}

fn source() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        8 => (0u8..4, any::<u8>(), prop_oneof![Just(7000u16), any::<u16>()])
            .prop_map(|(c, d, port)| SocketAddr::from(([10, 0, c, d], port))),
        1 => (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0))),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    let signing = prop_oneof![
        Just(Signing::Open),
        prop_oneof![-40_000i64..40_000, -1_000i64..1_000].prop_map(Signing::Ours),
        Just(Signing::Other),
    ];
    prop_oneof![
        // Random bytes, and random bytes that start like a datagram: open, keyed, or
        // of protocol version 1 (JSON).
        2 => prop::collection::vec(any::<u8>(), 0..1300).prop_map(Payload::Raw),
        1 => (
            prop::sample::select(vec![&b"\x02\x00"[..], &b"\x02\x01"[..], &b"{\"v\":1,\"m\":"[..]]),
            prop::collection::vec(any::<u8>(), 0..200)
        )
            .prop_map(|(start, b)| {
                let mut v = start.to_vec();
                v.extend(b);
                Payload::Raw(v)
            }),
        // Valid messages, perhaps mutated.
        4 => (message(), signing, prop::collection::vec(mutation(), 0..4))
            .prop_map(|(m, s, muts)| Payload::Message(m, s, muts)),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    (
        payload(),
        source(),
        prop_oneof![Just(0u64), 0u64..50, 0u64..5_000, Just(200_000)],
    )
        .prop_map(|(payload, source, advance_ms)| Input {
            payload,
            source,
            advance_ms,
        })
}

/// Feeds one input to both long-lived cores (byte path and shared-decoding path).
fn feed(input: &Input) -> Result<(), TestCaseError> {
    SUBJECTS.with(|subjects| {
        for subject in subjects.borrow_mut().iter_mut() {
            subject.now += input.advance_ms;
            let now = subject.now;
            let bytes = match &input.payload {
                Payload::Raw(bytes) => bytes.clone(),
                Payload::Message(msg, signing, mutations) => {
                    let key = the_key();
                    let other = ClusterKey::from_bytes([8; 32]);
                    let auth = |off: i64| Auth {
                        ctr: now.saturating_add_signed(off) * 1000,
                    };
                    let encoded = match signing {
                        Signing::Open => wire::encode(msg, None),
                        Signing::Ours(off) => wire::encode(msg, Some((&key, auth(*off)))),
                        Signing::Other => wire::encode(msg, Some((&other, auth(0)))),
                    };
                    let mut bytes = encoded.unwrap_or_default();
                    mutate(&mut bytes, mutations);
                    bytes
                }
            };
            let core = &mut subject.core;
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            core.handle_datagram(now, input.source, &bytes);
            for key in [None, Some(the_key())] {
                if let Ok(decoded) = Decoded::new(input.source, &bytes, key.as_ref()) {
                    core.handle_decoded(now, &decoded);
                }
            }
            while core.poll_transmit().is_some() {}
            while core.poll_event().is_some() {}
            let _ = core.peers(now);
            let _ = core.rejections(now);
            subject.fed += 1;
            check_bounds(&core.footprint())?;
        }
        Ok(())
    })
}

#[test]
fn datagrams_into_the_core_never_panic_nor_grow() {
    fuzz("datagrams", input(), |input| feed(&input));
    SUBJECTS.with(|subjects| {
        for s in subjects.borrow().iter() {
            let f = s.core.footprint();
            eprintln!(
                "FIGURE fuzz_datagrams_fed={} footprint={f:?} stats={:?}",
                s.fed,
                s.core.stats()
            );
            assert!(s.fed >= u64::from(cases()));
        }
    });
}

/// A flood of announcements from ever new node ids, each followed by its goodbye, in
/// an open and a keyed cluster: the table, tombstones and timer heap stay bounded (a
/// goodbye used to leave the peer's timer in the heap until its deadline, forever when
/// the peer announced a huge TTL).
#[test]
fn joining_and_leaving_forever_stays_bounded() {
    for key in [None, Some(the_key())] {
        let mut core = node(key.clone());
        let mut now = T0;
        let mut max = Footprint::default();
        for i in 0..50_000u64 {
            now += 1;
            let id = Uuid::from_u128(1_000 + u128::from(i));
            let ttl = if i % 2 == 0 { u64::MAX } else { 900 };
            let node = NodeRecord {
                id,
                name: format!("n{i}"),
                incarnation: 1,
                seq: 1,
                addr: "0.0.0.0:7000".parse().unwrap(),
                role: "daemon".into(),
                tags: BTreeMap::new(),
                interval_ms: 200,
                ttl_ms: ttl,
            };
            let source = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 7000));
            let sign = |ctr| key.as_ref().map(|k| (k, Auth { ctr }));
            let hello = wire::encode(
                &Message::Announce {
                    node,
                    reply_window_ms: 2,
                },
                sign(now * 1000),
            )
            .unwrap();
            let bye = wire::encode(
                &Message::Goodbye { id, incarnation: 1 },
                sign(now * 1000 + 1),
            )
            .unwrap();
            core.handle_datagram(now, source, &hello);
            core.handle_datagram(now, source, &bye);
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            while core.poll_transmit().is_some() {}
            while core.poll_event().is_some() {}
            let f = core.footprint();
            max.timers = max.timers.max(f.timers);
            max.tombstones = max.tombstones.max(f.tombstones);
            max.peers = max.peers.max(f.peers);
            max.replay = max.replay.max(f.replay);
            max.limiter = max.limiter.max(f.limiter);
        }
        let keyed = key.is_some();
        eprintln!("FIGURE join_leave_50000_keyed={keyed} max_footprint={max:?}");
        assert!(max.peers <= MAX_PEERS, "{max:?}");
        assert!(max.tombstones <= 2 * MAX_PEERS, "{max:?}");
        assert!(max.replay <= 2 * MAX_PEERS, "{max:?}");
        assert!(max.timers <= 4 * MAX_PEERS + 64, "{max:?}");
    }
}

/// Every well-formed message survives encoding and decoding unchanged, open and keyed,
/// and the decoder takes any bytes without panicking: random ones, and every cut and
/// single-byte change of a valid datagram.
#[test]
fn datagrams_round_trip_and_the_decoder_takes_any_bytes() {
    let sane = (message(), 1u64..10_000, 1u16..).prop_map(|(mut msg, ivl, port)| {
        let fix = |n: &mut NodeRecord| {
            n.interval_ms = ivl;
            n.ttl_ms = ivl.saturating_mul(4);
            n.addr.set_port(port);
        };
        match &mut msg {
            Message::Announce { node, .. } => fix(node),
            Message::Probe {
                node: Some(node), ..
            } => fix(node),
            _ => {}
        }
        msg
    });
    let strategy = (
        sane,
        any::<u64>(),
        any::<usize>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..1300),
    );
    let key = the_key();
    fuzz("wire_round_trip", strategy, |(msg, ctr, at, byte, junk)| {
        let open = wire::encode(&msg, None).unwrap();
        prop_assert_eq!(wire::decode(&open, None), Ok((msg.clone(), None)));
        let auth = Auth { ctr };
        let keyed = wire::encode(&msg, Some((&key, auth))).unwrap();
        prop_assert_eq!(
            wire::decode(&keyed, Some(&key)),
            Ok((msg.clone(), Some(auth)))
        );
        for bytes in [&open, &keyed] {
            let _ = wire::decode(&bytes[..at % bytes.len()], None);
            let _ = wire::decode(&bytes[..at % bytes.len()], Some(&key));
            let mut changed = bytes.clone();
            changed[at % bytes.len()] ^= byte | 1;
            let _ = wire::decode(&changed, None);
            // A changed keyed datagram never passes the key check.
            if bytes == &keyed {
                prop_assert!(wire::decode(&changed, Some(&key)).is_err());
            }
            let _ = wire::claimed_sender(&changed);
        }
        let _ = wire::decode(&junk, None);
        let _ = wire::decode(&junk, Some(&key));
        let _ = wire::claimed_sender(&junk);
        Ok(())
    });
}

fn frame() -> impl Strategy<Value = Frame> {
    let text = "[ -~]{0,20}";
    prop_oneof![
        text.prop_map(|name| Frame::Hello { name }),
        (text, any::<usize>(), prop::collection::vec(text, 0..3)).prop_map(
            |(name, slots, features)| Frame::Welcome {
                name,
                slots,
                tags: BTreeMap::new(),
                features
            }
        ),
        (any::<u64>(), text, any::<i64>()).prop_map(|(id, name, n)| Frame::Call {
            id,
            name,
            arg: serde_json::json!({ "n": n, "list": [n, "x", null] }),
        }),
        (
            any::<u64>(),
            prop::collection::vec(text, 0..4),
            any::<Option<u64>>(),
            any::<bool>()
        )
            .prop_map(|(id, argv, timeout_ms, stdin)| Frame::Exec {
                id,
                argv,
                timeout_ms,
                stdin
            }),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(id, data)| Frame::Input { id, data }),
        (any::<u64>(), prop::option::of(text))
            .prop_map(|(id, sha256)| Frame::InputEnd { id, sha256 }),
        any::<u64>().prop_map(|id| Frame::InputTaken { id }),
        (
            any::<u64>(),
            text,
            text,
            any::<u32>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(id, path, name, mode, size, into_dir)| Frame::PutFile {
                id,
                path,
                name,
                mode,
                size,
                into_dir
            }),
        (any::<u64>(), text).prop_map(|(id, path)| Frame::GetFile { id, path }),
        any::<u64>().prop_map(|id| Frame::Kill { id }),
        (
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>()
        )
            .prop_map(|(id, data, err)| Frame::Output {
                id,
                stream: if err { Stream::Stderr } else { Stream::Stdout },
                data
            }),
        (any::<u64>(), any::<Option<i32>>()).prop_map(|(id, code)| Frame::Exit {
            id,
            exit: JobExit {
                code,
                signal: None,
                timed_out: false,
                error: None,
                refused: false,
                lost: false,
            },
        }),
        any::<bool>().prop_map(|on| Frame::RedirectLogs { on }),
        prop::collection::vec(text, 0..4).prop_map(|lines| Frame::Log { lines }),
        Just(Frame::Terminate),
        Just(Frame::Terminating),
        Just(Frame::Ping),
    ]
}

#[test]
fn session_frames_never_panic_the_decoder() {
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2000),
        (frame(), prop::collection::vec(mutation(), 0..6)).prop_map(|(f, muts)| {
            let mut bytes = serde_json::to_vec(&f).unwrap_or_default();
            mutate(&mut bytes, &muts);
            bytes
        }),
        // Deep nesting: serde_json's recursion limit must hold.
        (1usize..5000).prop_map(|depth| {
            let mut v = b"{\"t\":\"call\",\"id\":1,\"name\":\"f\",\"arg\":".to_vec();
            v.extend(std::iter::repeat_n(b'[', depth));
            v
        }),
    ];
    fuzz("session_frames", strategy, |bytes| {
        let _ = localnet::fuzzing::decode_session_frame(&bytes);
        Ok(())
    });
    // The unmutated frames all decode.
    let mut runner = TestRunner::default();
    runner
        .run(&frame(), |f| {
            let bytes = serde_json::to_vec(&f).unwrap();
            prop_assert!(localnet::fuzzing::decode_session_frame(&bytes));
            Ok(())
        })
        .unwrap();
}

/// Byte streams into the transport's accepting side and frame reader, over loopback
/// TCP: a plain preamble then random frames, or random bytes from the start.
#[test]
fn transport_streams_never_panic_the_frame_reader() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let chunk = prop_oneof![
        // A well-formed frame header with random contents.
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|body| {
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend(body);
            v
        }),
        // A lying header (up to 4 GiB announced).
        any::<u32>().prop_map(|len| len.to_be_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    let stream = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| (b, false)),
        4 => (prop::sample::select(vec![&b"LNET1\nP"[..], &b"LNET1\nN"[..]]),
              prop::collection::vec(chunk, 0..6))
            .prop_map(|(pre, chunks)| (pre.iter().copied().chain(chunks.concat()).collect(), true)),
    ];
    // One loopback TCP connection per case: capped, so that a long run of the other
    // fuzzers does not take hours here.
    let cases = cases().min(1_000_000);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let started = Instant::now();
    let key = the_key();
    let result = runner.run(&stream, |(bytes, _)| {
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let client = tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = c.write_all(&bytes).await;
                let _ = c.shutdown().await;
                // Read the status byte (if any) so the server's write does not fail.
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut c, &mut sink).await;
            });
            let (server, _) = listener.accept().await.unwrap();
            // Both setups: an open listener and a keyed one, alternately by port parity.
            let keyed = server
                .peer_addr()
                .map(|a| a.port() % 2 == 0)
                .unwrap_or(false);
            let k = keyed.then_some(&key);
            if let Ok((mut reader, _writer)) = localnet::transport::accept(server, k).await {
                let mut frames = 0;
                while let Ok(Some(payload)) = reader.read().await {
                    assert!(payload.len() <= localnet::transport::MAX_FRAME);
                    let _ = localnet::fuzzing::decode_session_frame(&payload);
                    frames += 1;
                    assert!(frames < 1000);
                }
            }
            let _ = client.await;
        });
        Ok(())
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "FIGURE fuzz_transport_cases={cases} seconds={secs:.1} cases_per_s={:.0}",
        f64::from(cases) / secs
    );
    result.unwrap();
}

#[test]
fn control_requests_never_panic_the_parser() {
    let fields = prop_oneof![
        Just("\"cmd\":\"peers\"".to_string()),
        Just("\"cmd\":\"status\"".to_string()),
        Just("\"cmd\":\"watch\"".to_string()),
        "\"cmd\":\"[a-z]{0,8}\"",
        any::<i64>().prop_map(|n| format!("\"wait_for\":{n}")),
        any::<u64>().prop_map(|n| format!("\"timeout_ms\":{n}")),
        "\"[a-z_]{1,10}\":(null|true|[0-9]{1,30}|\"[ -~]{0,10}\"|\\[\\]|\\{\\})",
    ];
    let line = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..500),
        (
            prop::collection::vec(fields, 0..5),
            prop::collection::vec(mutation(), 0..3)
        )
            .prop_map(|(f, muts)| {
                let mut bytes = format!("{{{}}}\n", f.join(",")).into_bytes();
                mutate(&mut bytes, &muts);
                bytes
            }),
    ];
    fuzz("control_requests", line, |bytes| {
        match control::parse_request(&bytes) {
            Ok(_) => {}
            Err(e) => prop_assert!(e.starts_with("bad request"), "{e}"),
        }
        Ok(())
    });
    assert_eq!(
        control::parse_request(b"{\"cmd\":\"peers\",\"wait_for\":3}\n"),
        Ok(control::Request::Peers {
            wait_for: Some(3),
            timeout_ms: None
        })
    );
}
