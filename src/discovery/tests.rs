//! Tests of the discovery state machine.
use super::*;

fn node(id: u128, key: Option<ClusterKey>, observer: bool) -> Discovery {
    node_at(id, key, observer, 1_000_000)
}

/// Node `id`'s own description: name `n<id>`, incarnation 1, a daemon.
fn local_node(id: u128) -> LocalNode {
    LocalNode {
        id: MemberId::from_u128(id),
        name: format!("n{id}"),
        incarnation: 1,
        addr: "0.0.0.0:7000".parse().unwrap(),
        role: "daemon".into(),
        tags: BTreeMap::new(),
    }
}

/// A node made at `now` (its seed is its id).
fn node_at(id: u128, key: Option<ClusterKey>, observer: bool, now: Millis) -> Discovery {
    let me = local_node(id);
    let cfg = Config {
        observer,
        ..Config::default()
    };
    Discovery::new(cfg, me, key, id as u64, now).unwrap()
}

/// Node `id`'s record as mDNS brings it: at `10.0.0.<ip>:7000`, a long TTL.
fn mdns_record(id: u128, ip: u8, incarnation: u64) -> NodeRecord {
    NodeRecord {
        id: MemberId::from_u128(id),
        name: format!("n{id}"),
        incarnation,
        seq: 0,
        addr: SocketAddr::from(([10, 0, 0, ip], 7000)),
        role: "daemon".into(),
        tags: BTreeMap::new(),
        interval_ms: 60_000,
        ttl_ms: 120_000,
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 9000))
}

/// Node `id` (a member) started at `t`, what it sent at start drained.
fn started(id: u128, t: Millis) -> Discovery {
    let mut n = node(id, None, false);
    n.start(t);
    drain(&mut n);
    n
}

/// Node `id` started at `t`, and the first datagram it sent (its probe).
fn first_probe(id: u128, observer: bool, t: Millis) -> (Discovery, Transmit) {
    let mut n = node(id, None, observer);
    n.start(t);
    let probe = drain(&mut n).remove(0);
    (n, probe)
}

/// Nodes 1 and 2 started at `t`; node 1's own first datagrams drained, then node 2's
/// first probe handled by node 1, which so knows node 2 (its answer still queued).
fn a_knows_b(t: Millis) -> (Discovery, Discovery) {
    let mut a = node(1, None, false);
    let mut b = node(2, None, false);
    a.start(t);
    b.start(t);
    drain(&mut a);
    let probe = drain(&mut b).remove(0);
    a.handle_datagram(t, addr(2), &probe.payload);
    (a, b)
}

fn drain(n: &mut Discovery) -> Vec<Transmit> {
    std::iter::from_fn(|| n.poll_transmit()).collect()
}

fn events(n: &mut Discovery) -> Vec<PeerEvent> {
    std::iter::from_fn(|| n.poll_event()).collect()
}

#[test]
fn probe_teaches_both_sides() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    let mut b = node(2, None, false);
    a.start(t);
    drain(&mut a);
    b.start(t + 5);
    let probe = drain(&mut b).remove(0);
    a.handle_datagram(t + 6, addr(2), &probe.payload);
    assert!(matches!(events(&mut a)[..], [PeerEvent::Joined(ref p)] if p.name == "n2"));
    // The reply is jittered; run a's timers until it goes out.
    let at = a.poll_timeout().unwrap();
    assert!(
        at <= t + 6 + 2,
        "reply delay for a tiny group is small: {at}"
    );
    a.handle_timeout(at);
    let reply = drain(&mut a).remove(0);
    // A small group answers a member starting by multicast: no address resolution,
    // and whoever else missed the record gets it too.
    assert_eq!(reply.dest, Destination::Group);
    b.handle_datagram(at + 1, addr(1), &reply.payload);
    let ev = events(&mut b);
    assert!(
        matches!(&ev[..], [PeerEvent::Joined(p)] if p.name == "n1" && p.addr == "10.0.0.1:7000".parse().unwrap())
    );
}

/// A node whose budget makes even a group of two "large" (every record does not fit
/// in a quarter second of it): it answers by unicast, as a group of hundreds does.
fn node_in_large_group(id: u128) -> Discovery {
    let cfg = Config {
        budget_bytes_per_sec: 100,
        ..Config::default()
    };
    Discovery::new(cfg, local_node(id), None, id as u64, 1_000_000).unwrap()
}

/// A record request that brings nothing (it or its answer was lost) is sent again
/// after 40 ms, without waiting for the member's next heartbeat.
#[test]
fn a_lost_record_request_is_sent_again_before_the_next_heartbeat() {
    let t = 1_000_000;
    let mut a = started(1, t);
    let b = started(2, t);
    let beat = wire::encode(&b.heartbeat_message(), None).unwrap();
    a.handle_datagram(t + 1, addr(2), &beat);
    let is_ask = |x: &Transmit| {
        matches!(
            wire::decode(&x.payload, None),
            Ok((Message::Ping { target, .. }, _)) if target == MemberId::from_u128(2)
        )
    };
    assert_eq!(drain(&mut a).iter().filter(|x| is_ask(x)).count(), 1);
    // Lost. Nothing more from b, and no heartbeat: a asks again on its own, this time
    // with a direct probe (which a member that counts the group as large answers).
    let is_probe = |x: &Transmit| {
        x.dest == Destination::Unicast(addr(2))
            && matches!(
                wire::decode(&x.payload, None),
                Ok((Message::Probe { direct: true, .. }, _))
            )
    };
    a.handle_timeout(t + 40);
    assert!(!drain(&mut a).iter().any(is_probe), "too early");
    a.handle_timeout(t + 41);
    assert_eq!(drain(&mut a).iter().filter(|x| is_probe(x)).count(), 1);
    // b answers it with its record by unicast, as a large group does.
    let mut big = node_in_large_group(2);
    big.start(t);
    drain(&mut big);
    let beat = wire::encode(&big.heartbeat_message(), None).unwrap();
    let mut c = started(3, t);
    c.handle_datagram(t + 1, addr(2), &beat);
    let ping = drain(&mut c).remove(0);
    assert!(is_ask(&ping), "c counts the group as small");
    big.handle_datagram(t + 2, addr(3), &ping.payload);
    let answer = drain(&mut big).remove(0);
    assert!(
        matches!(
            wire::decode(&answer.payload, None),
            Ok((Message::Heartbeat { .. }, _))
        ),
        "a large group answers a ping with a heartbeat"
    );
    c.handle_datagram(t + 3, addr(2), &answer.payload);
    c.handle_timeout(t + 41);
    let probe = drain(&mut c)
        .into_iter()
        .find(|x| is_probe(x))
        .expect("then a direct probe");
    big.handle_datagram(t + 42, addr(3), &probe.payload);
    let record = drain(&mut big).remove(0);
    assert_eq!(record.dest, Destination::Unicast(addr(3)));
    c.handle_datagram(t + 43, addr(2), &record.payload);
    assert_eq!(c.peer_count(), 1, "the record came");
}

/// The ping that asks for a record comes right after the heartbeat that made it (well
/// within the gap between two answers to pings): it is answered all the same.
#[test]
fn a_ping_right_after_our_heartbeat_is_answered_with_our_record() {
    let t = 1_000_000;
    let mut a = started(1, t);
    let mut b = started(2, t);
    // b's own heartbeat, from its timers.
    let beat_at = b.poll_timeout().unwrap();
    let mut now = beat_at;
    let beat = loop {
        b.handle_timeout(now);
        if let Some(x) = drain(&mut b).into_iter().find(|x| {
            matches!(
                wire::decode(&x.payload, None),
                Ok((Message::Heartbeat { .. }, _))
            )
        }) {
            break x;
        }
        now = b.poll_timeout().unwrap();
        assert!(now < t + 2_000, "no heartbeat");
    };
    a.handle_datagram(now, addr(2), &beat.payload);
    let ping = drain(&mut a).remove(0);
    assert!(matches!(
        wire::decode(&ping.payload, None),
        Ok((Message::Ping { .. }, _))
    ));
    b.handle_datagram(now + 1, addr(1), &ping.payload);
    let answer = drain(&mut b);
    assert_eq!(answer.len(), 1, "answered");
    assert!(matches!(
        wire::decode(&answer[0].payload, None),
        Ok((Message::Announce { .. }, _))
    ));
}

/// A large group answers one member starting, and a request for a record, by
/// unicast (multicast answers to all would cost every member the whole group's
/// records); a small one by multicast (see `probe_teaches_both_sides` and
/// `unknown_heartbeats_ask_for_the_record_bounded`).
#[test]
fn a_large_group_answers_a_newcomer_and_a_record_request_by_unicast() {
    let t = 1_000_000;
    let mut a = node_in_large_group(1);
    let mut b = node_in_large_group(2);
    a.start(t);
    drain(&mut a);
    b.start(t + 5);
    let probe = drain(&mut b).remove(0);
    a.handle_datagram(t + 6, addr(2), &probe.payload);
    let is_record = |x: &Transmit| {
        matches!(
            wire::decode(&x.payload, None),
            Ok((Message::Announce { .. }, _))
        )
    };
    let reply = loop {
        let now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
        if let Some(x) = drain(&mut a).into_iter().find(is_record) {
            break x;
        }
        assert!(now < t + 2_000, "no answer");
    };
    assert_eq!(reply.dest, Destination::Unicast(addr(2)));
    // c missed a's record: hearing a's heartbeat, it asks a alone for it.
    let mut c = node_in_large_group(3);
    c.start(t);
    drain(&mut c);
    let beat = wire::encode(&a.heartbeat_message(), None).unwrap();
    c.handle_datagram(t + 10, addr(1), &beat);
    let ask = drain(&mut c).remove(0);
    assert_eq!(ask.dest, Destination::Unicast(addr(1)));
    a.handle_datagram(t + 11, addr(3), &ask.payload);
    let answer = drain(&mut a).remove(0);
    assert_eq!(answer.dest, Destination::Unicast(addr(3)));
    c.handle_datagram(t + 12, addr(1), &answer.payload);
    assert_eq!(c.peer_count(), 1);
}

#[test]
fn goodbye_removes_and_silence_fails() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    let mut b = node(2, None, false);
    let mut c = node(3, None, false);
    a.start(t);
    b.start(t);
    c.start(t);
    drain(&mut a);
    let pb = drain(&mut b).remove(0);
    let pc = drain(&mut c).remove(0);
    a.handle_datagram(t, addr(2), &pb.payload);
    a.handle_datagram(t, addr(3), &pc.payload);
    assert_eq!(a.peer_count(), 2);
    events(&mut a);
    b.leave(t + 10);
    let bye = drain(&mut b);
    assert_eq!(bye.len(), 2);
    a.handle_datagram(t + 10, addr(2), &bye[0].payload);
    a.handle_datagram(t + 10, addr(2), &bye[1].payload);
    assert!(matches!(&events(&mut a)[..], [PeerEvent::Left(p)] if p.name == "n2"));
    // c is never heard again: suspect, probed directly, then failed at its TTL.
    let ttl = ttl_for(Config::default().min_interval_ms);
    let mut now = t;
    let mut direct_probes = 0;
    while a.peer_count() > 0 {
        now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
        direct_probes += drain(&mut a)
            .iter()
            .filter(|x| x.dest == Destination::Unicast(addr(3)))
            .count();
        assert!(now <= t + ttl, "failed late: {}", now - t);
    }
    assert_eq!(now, t + ttl);
    assert!(direct_probes >= 5, "{direct_probes}");
    assert!(matches!(&events(&mut a)[..], [PeerEvent::Failed(p)] if p.name == "n3"));
}

#[test]
fn answered_direct_probe_keeps_a_suspect_alive() {
    let t = 1_000_000;
    let (mut a, mut b) = a_knows_b(t);
    // b's announcements are lost; only its answers to direct probes get through.
    let mut now = t;
    while now < t + 10_000 {
        now = a.poll_timeout().unwrap().min(b.poll_timeout().unwrap());
        a.handle_timeout(now);
        b.handle_timeout(now);
        drain(&mut b);
        for x in drain(&mut a) {
            if x.dest == Destination::Unicast(addr(2)) {
                b.handle_datagram(now, addr(1), &x.payload);
                for answer in drain(&mut b) {
                    a.handle_datagram(now, addr(2), &answer.payload);
                }
            }
        }
    }
    assert_eq!(a.peer_count(), 1);
    assert!(
        !events(&mut a)
            .iter()
            .any(|e| matches!(e, PeerEvent::Failed(_)))
    );
}

#[test]
fn restart_with_new_incarnation_is_an_update() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    a.start(t);
    let mut b = node(2, None, false);
    b.start(t);
    a.handle_datagram(t, addr(2), &drain(&mut b)[0].payload);
    let mut me = LocalNode {
        incarnation: 2,
        addr: "0.0.0.0:7001".parse().unwrap(),
        ..local_node(2)
    };
    let mut b2 = Discovery::new(Config::default(), me.clone(), None, 9, t).unwrap();
    b2.start(t + 50);
    a.handle_datagram(t + 50, addr(2), &drain(&mut b2)[0].payload);
    let ev = events(&mut a);
    assert!(matches!(&ev[..], [PeerEvent::Joined(_), PeerEvent::Updated(p)] if p.incarnation == 2));
    assert_eq!(a.peer_count(), 1);
    me.incarnation = 1; // the old incarnation speaks again: ignored
    let mut old = Discovery::new(Config::default(), me, None, 9, t).unwrap();
    old.start(t + 60);
    a.handle_datagram(t + 60, addr(2), &drain(&mut old)[0].payload);
    assert_eq!(a.peers(t + 60)[0].incarnation, 2);
}

#[test]
fn observer_is_never_listed_and_never_announces() {
    let t = 1_000_000;
    let mut member = started(1, t);
    let (mut obs, probe) = first_probe(2, true, t);
    member.handle_datagram(t, addr(2), &probe.payload);
    assert_eq!(member.peer_count(), 0);
    let at = member.poll_timeout().unwrap();
    member.handle_timeout(at);
    let reply = drain(&mut member).remove(0);
    assert_eq!(reply.dest, Destination::Unicast(addr(2)));
    obs.handle_datagram(at, addr(1), &reply.payload);
    assert_eq!(obs.peer_count(), 1);
    // Observers send no announcements (nor heartbeats), whatever the time.
    for _ in 0..50 {
        let next = obs.poll_timeout().unwrap();
        obs.handle_timeout(next);
    }
    let sent = drain(&mut obs);
    assert!(!sent.is_empty(), "its second probe at least");
    assert!(sent.iter().all(|x| matches!(
        wire::decode(&x.payload, None),
        Ok((Message::Probe { node: None, .. }, _))
    )));
    obs.leave(t + 100_000);
    assert!(drain(&mut obs).is_empty(), "observers say no goodbye");
}

#[test]
fn replays_and_stale_counters_are_refused() {
    let t = 1_000_000_000;
    let key = ClusterKey::from_bytes([3; 32]);
    let me = |id: u128| LocalNode {
        id: MemberId::from_u128(id),
        name: format!("n{id}"),
        incarnation: 1,
        addr: "0.0.0.0:7000".parse().unwrap(),
        role: "daemon".into(),
        tags: BTreeMap::new(),
    };
    let mut a = Discovery::new(Config::default(), me(1), Some(key.clone()), 1, t).unwrap();
    let mut b = Discovery::new(Config::default(), me(2), Some(key.clone()), 2, t).unwrap();
    a.start(t);
    b.start(t);
    let probe = drain(&mut b).remove(0);
    a.handle_datagram(t, addr(2), &probe.payload);
    assert_eq!(a.peer_count(), 1);
    a.handle_datagram(t + 1, addr(2), &probe.payload);
    assert_eq!(a.stats().dropped_replay, 1);
    // b says goodbye; replaying its old probe must not bring it back.
    b.leave(t + 5);
    for bye in drain(&mut b) {
        a.handle_datagram(t + 5, addr(2), &bye.payload);
    }
    assert_eq!(a.peer_count(), 0);
    a.handle_datagram(t + 6, addr(2), &probe.payload);
    assert_eq!(a.peer_count(), 0);
    // A sender whose clock is far off is refused.
    let mut far = Discovery::new(Config::default(), me(3), Some(key), 3, t + 60_000).unwrap();
    far.start(t + 60_000);
    a.handle_datagram(t + 7, addr(3), &drain(&mut far)[0].payload);
    assert_eq!(a.peer_count(), 0);
    assert_eq!(a.stats().dropped_replay, 3);
}

#[test]
fn refusals_are_recorded_per_source_and_explain_unverified_peers() {
    let t = 1_000_000_000;
    let key = ClusterKey::from_bytes([3; 32]);
    let mut a = node_at(1, Some(key.clone()), false, t);
    a.start(t);
    // A keyed node whose clock is 41 s ahead.
    let mut ahead = node_at(2, Some(key.clone()), false, t + 41_000);
    ahead.start(t + 41_000);
    for x in drain(&mut ahead) {
        a.handle_datagram(t + 1, addr(2), &x.payload);
    }
    // One without a key, one with another key, and one behind by 35 s.
    let mut open = node_at(3, None, false, t);
    open.start(t);
    a.handle_datagram(t + 2, addr(3), &drain(&mut open)[0].payload);
    let mut other = node_at(4, Some(ClusterKey::from_bytes([9; 32])), false, t);
    other.start(t);
    a.handle_datagram(t + 3, addr(4), &drain(&mut other)[0].payload);
    let mut behind = node_at(5, Some(key), false, t - 35_000);
    behind.start(t - 35_000);
    a.handle_datagram(t + 4, addr(5), &drain(&mut behind)[0].payload);
    assert_eq!(a.peer_count(), 0);
    let seen = a.rejections(t + 10);
    let of = |i: u8| seen.iter().find(|r| r.source == addr(i)).unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        matches!(of(2).reason, Refusal::ClockOff { offset_ms } if (40_990..=41_010).contains(&offset_ms))
    );
    assert_eq!(of(2).count, 1);
    assert_eq!(of(2).name.as_deref(), Some("n2"));
    assert_eq!(of(2).id, Some(MemberId::from_u128(2)));
    assert_eq!(of(2).reason.to_string(), "clock off by 41 s (ahead)");
    assert_eq!(of(3).reason, Refusal::SenderUnkeyed);
    assert_eq!(
        of(3).name.as_deref(),
        Some("n3"),
        "claimed, for diagnostics"
    );
    assert_eq!(of(4).reason, Refusal::OtherKey);
    assert_eq!(of(5).reason.to_string(), "clock off by 35 s (behind)");
    assert_eq!(seen[0].source, addr(5), "most recent first");
    // The fast node is seen through mDNS: unverified, and the listing says why.
    let record = |id: u128, ip: u8| mdns_record(id, ip, 1);
    a.observe_mdns(t + 20, record(2, 2));
    a.observe_mdns(t + 20, record(6, 6));
    let peers = a.peers(t + 20);
    assert_eq!(peers.len(), 2);
    assert!(!peers[0].verified);
    assert_eq!(
        peers[0].unverified_reason.as_deref(),
        Some("clock off by 41 s (ahead)")
    );
    assert!(
        peers[1]
            .unverified_reason
            .as_deref()
            .unwrap()
            .contains("no authenticated datagram")
    );
    // A keyless node records the keyed sender's refusal as such.
    let mut bare = node_at(7, None, false, t);
    bare.start(t);
    let mut keyed = node_at(8, Some(ClusterKey::from_bytes([3; 32])), false, t);
    keyed.start(t);
    bare.handle_datagram(t, addr(8), &drain(&mut keyed)[0].payload);
    assert_eq!(bare.rejections(t)[0].reason, Refusal::SenderKeyed);
    // Forgotten a minute after the last one.
    a.handle_timeout(t + 200_000);
    assert!(a.rejections(t + 200_000).is_empty());
}

#[test]
fn refusals_are_bounded() {
    let t = 1_000_000_000;
    let mut a = node_at(1, Some(ClusterKey::from_bytes([3; 32])), false, t);
    a.start(t);
    let mut open = node_at(3, None, false, t);
    open.start(t);
    let probe = drain(&mut open).remove(0);
    for i in 0..10_000u32 {
        let src = SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 9000));
        a.handle_datagram(t + u64::from(i), src, &probe.payload);
    }
    assert_eq!(a.footprint().rejections, MAX_REJECTIONS);
    assert_eq!(a.stats().dropped_auth, 10_000);
    // The newest are kept.
    let newest = SocketAddr::from(([10, 9, (9_999u32 >> 8) as u8, 9_999u32 as u8], 9000));
    assert_eq!(a.rejections(t + 10_000)[0].source, newest);
}

#[test]
fn mdns_entries_merge_with_multicast_and_tombstones_hold() {
    let t = 1_000_000;
    let mut a = started(1, t);
    let (_b, probe) = first_probe(2, false, t);
    let mdns_record = |incarnation| mdns_record(2, 2, incarnation);
    // Seen first through mDNS: one entry; then multicast: still one, both paths.
    a.observe_mdns(t, mdns_record(1));
    a.handle_datagram(t + 1, addr(2), &probe.payload);
    assert_eq!(a.peer_count(), 1);
    assert_eq!(a.peers(t + 1)[0].paths, vec!["multicast", "mdns"]);
    let ev = events(&mut a);
    assert!(matches!(&ev[..], [PeerEvent::Joined(_)]), "{ev:?}");
    // mDNS removal keeps a peer multicast still hears.
    a.mdns_removed(t + 2, MemberId::from_u128(2));
    assert_eq!(a.peer_count(), 1);
    // Multicast declares it failed; the mDNS cache cannot bring it back.
    let mut now = t;
    while a.peer_count() > 0 {
        now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
    }
    a.observe_mdns(now + 1, mdns_record(1));
    assert_eq!(a.peer_count(), 0);
    // A restarted incarnation is welcome at once.
    a.observe_mdns(now + 2, mdns_record(2));
    assert_eq!(a.peer_count(), 1);
    assert_eq!(a.peers(now + 2)[0].paths, vec!["mdns"]);
    // An mDNS-only entry is not expired by multicast timers; removal ends it.
    for _ in 0..20 {
        let next = a.poll_timeout().unwrap();
        a.handle_timeout(next);
    }
    assert_eq!(a.peer_count(), 1);
    a.mdns_removed(now + 3, MemberId::from_u128(2));
    assert_eq!(a.peer_count(), 0);
}

#[test]
fn rate_limit_per_source() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    a.start(t);
    for _ in 0..1000 {
        a.handle_datagram(t, addr(9), b"\x02junk");
    }
    let s = a.stats().clone();
    assert_eq!(s.dropped_malformed, 100);
    assert_eq!(s.dropped_rate, 900);
    // Other sources are unaffected, and the bucket refills.
    a.handle_datagram(t, addr(8), b"\x02junk");
    a.handle_datagram(t + 1000, addr(9), b"\x02junk");
    assert_eq!(a.stats().dropped_malformed, 102);
}

/// Runs two identical groups in lockstep, one fed raw bytes (each core decodes its
/// copy), the other one shared [`Decoded`] per datagram; every output must agree.
#[test]
fn decoding_once_for_many_cores_changes_nothing() {
    let t0 = 1_000_000_000;
    for key in [None, Some(ClusterKey::from_bytes([4; 32]))] {
        let make = || -> Vec<Discovery> {
            (1..=6)
                .map(|i| node_at(i, key.clone(), false, t0))
                .collect()
        };
        let (mut raw, mut shared) = (make(), make());
        let src = |i: usize| SocketAddr::from(([10, 0, 0, i as u8 + 1], 7000));
        for t in (t0..t0 + 4_000).step_by(5) {
            if t == t0 + 2_000 {
                raw[5].leave(t);
                shared[5].leave(t);
            }
            for i in 0..6 {
                if i == 4 && t > t0 + 1_000 {
                    continue; // node 4 goes silent: suspected, probed, failed
                }
                if t == t0 + 10 * i as u64 {
                    raw[i].start(t);
                    shared[i].start(t);
                }
                if raw[i].poll_timeout().is_some_and(|d| d <= t) {
                    raw[i].handle_timeout(t);
                    shared[i].handle_timeout(t);
                }
                let (a, b) = (drain(&mut raw[i]), drain(&mut shared[i]));
                assert_eq!(a, b, "transmits of node {i} at {t}");
                for x in a {
                    let decoded = Decoded::new(src(i), &x.payload, key.as_ref()).unwrap();
                    for j in (0..6).filter(|&j| j != i && !(j == 4 && t > t0 + 1_000)) {
                        if x.dest == Destination::Group || x.dest == Destination::Unicast(src(j)) {
                            raw[j].handle_datagram(t, src(i), &x.payload);
                            shared[j].handle_decoded(t, &decoded);
                        }
                    }
                }
            }
            for i in 0..6 {
                assert_eq!(events(&mut raw[i]), events(&mut shared[i]), "events at {t}");
            }
        }
        for i in 0..6 {
            assert_eq!(raw[i].stats(), shared[i].stats());
            assert_eq!(raw[i].peers(t0 + 4_000), shared[i].peers(t0 + 4_000));
        }
        assert_eq!(raw[0].peer_count(), 3, "5 left, 4 failed");
        assert!(raw[0].stats().received > 50, "{:?}", raw[0].stats());
    }
    // A datagram decoded with another key (or none) is refused as `handle_datagram`
    // refuses its bytes.
    let key = ClusterKey::from_bytes([5; 32]);
    let me = LocalNode {
        id: MemberId::from_u128(9),
        name: "n9".into(),
        incarnation: 1,
        addr: "0.0.0.0:7000".parse().unwrap(),
        role: "daemon".into(),
        tags: BTreeMap::new(),
    };
    let mut sender = Discovery::new(Config::default(), me, None, 9, t0).unwrap();
    sender.start(t0);
    let probe = drain(&mut sender).remove(0);
    let mut a = node(1, Some(key.clone()), false);
    let mut b = node(1, Some(key), false);
    a.handle_datagram(t0, addr(9), &probe.payload);
    b.handle_decoded(t0, &Decoded::new(addr(9), &probe.payload, None).unwrap());
    assert_eq!(a.stats(), b.stats());
    assert_eq!(a.stats().dropped_auth, 1);
    assert_eq!(b.peer_count(), 0);
}

/// Makes `a` know `members - 1` peers (adding to those it knows), each from its first
/// probe at `t`.
fn grow_to(a: &mut Discovery, members: usize, t: Millis) {
    for i in a.peer_count() as u128..members as u128 - 1 {
        let mut b = node(10_000 + i, None, false);
        b.start(t);
        let probe = drain(&mut b).remove(0);
        let src = SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 9000));
        a.handle_datagram(t, src, &probe.payload);
    }
}

#[test]
fn interval_follows_group_size_and_budget() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    a.start(t);
    assert_eq!(a.compute_interval(), Config::default().min_interval_ms);
    grow_to(&mut a, 2001, t);
    assert_eq!(a.peer_count(), 2001 - 1);
    let interval = a.compute_interval();
    let expected = 2001.0 * a.avg_size * 1000.0 / 64_000.0;
    assert!(
        (interval as f64 - expected).abs() < 2.0,
        "{interval} vs {expected}"
    );
    assert!(interval > 1_000);
}

/// Multicast answers to newcomers are spaced by half the interval the group would have
/// without its floor: a few milliseconds in a small group (where the floor would have
/// made them wait a quarter of 280 ms), half the interval in a large one.
#[test]
fn answers_to_newcomers_are_spaced_by_twice_the_budget() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    a.start(t);
    assert_eq!(a.answer_gap(), MIN_ANSWER_GAP_MS);
    let gap_at = |a: &mut Discovery, members: usize| {
        grow_to(a, members, t);
        let expected = members as f64 * a.avg_size * 1000.0 / 128_000.0;
        (a.answer_gap(), expected)
    };
    let (gap, expected) = gap_at(&mut a, 50);
    assert!((gap as f64 - expected).abs() < 2.0, "{gap} vs {expected}");
    assert!(gap < Config::default().min_interval_ms / 4, "{gap}");
    let (gap, expected) = gap_at(&mut a, 2000);
    assert!((gap as f64 - expected).abs() < 2.0, "{gap} vs {expected}");
    assert!(gap.abs_diff(a.compute_interval() / 2) <= 2, "{gap}");
}

/// An idle member multicasts small heartbeats, and its full record only at the slow
/// refresh; a receiver that knows it stays refreshed by the heartbeats alone.
#[test]
fn idle_members_send_heartbeats_and_a_slow_refresh() {
    let t = 1_000_000;
    let (mut a, mut b) = a_knows_b(t);
    drain(&mut a);
    let (mut heartbeats, mut records) = (0, 0);
    let mut now = t;
    while now < t + 60_000 {
        now = b.poll_timeout().unwrap();
        b.handle_timeout(now);
        for x in drain(&mut b) {
            match wire::decode(&x.payload, None).unwrap().0 {
                Message::Heartbeat { .. } => {
                    assert!(x.payload.len() <= 30, "{}", x.payload.len());
                    heartbeats += 1;
                }
                Message::Announce { .. } => records += 1,
                Message::Probe { .. } if now < t + 1_000 => {} // its second probe
                other => panic!("unexpected {other:?}"),
            }
            a.handle_datagram(now, addr(2), &x.payload);
        }
        a.handle_timeout(now.min(a.poll_timeout().unwrap()));
        // No suspicion, no record request: no direct probe, no ping.
        assert!(drain(&mut a).iter().all(|x| !matches!(
            wire::decode(&x.payload, None),
            Ok((
                Message::Probe { direct: true, .. } | Message::Ping { .. },
                _
            ))
        )));
    }
    // One every 280 to 308 ms, and a record every 15 to 25 s.
    assert!((190..=215).contains(&heartbeats), "{heartbeats}");
    assert!((2..=4).contains(&records), "{records}");
    assert_eq!(a.peer_count(), 1, "kept alive by heartbeats");
    assert_eq!(a.stats().record_requests, 0, "nothing to ask");
}

/// A heartbeat of a member not known (or whose newer record is not held) makes a
/// direct probe asking for the record, once per member until it is due again; the
/// answer brings the record.
#[test]
fn unknown_heartbeats_ask_for_the_record_bounded() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    let mut b = node(2, None, false);
    a.start(t);
    b.start(t);
    drain(&mut a);
    drain(&mut b); // b's probes are lost: a does not know it
    let beat = |b: &Discovery| wire::encode(&b.heartbeat_message(), None).unwrap();
    a.handle_datagram(t + 1, addr(2), &beat(&b));
    a.handle_datagram(t + 2, addr(2), &beat(&b));
    let asks = drain(&mut a);
    assert_eq!(asks.len(), 1, "asked once");
    // In a small group the request is a multicast ping for b (no address resolution
    // on the way there), answered with b's record to the group (none on the way back).
    assert_eq!(asks[0].dest, Destination::Group);
    assert!(matches!(
        wire::decode(&asks[0].payload, None),
        Ok((Message::Ping { target, .. }, _)) if target == MemberId::from_u128(2)
    ));
    b.handle_datagram(t + 3, addr(1), &asks[0].payload);
    let answer = drain(&mut b).remove(0);
    assert_eq!(answer.dest, Destination::Group);
    assert!(matches!(
        wire::decode(&answer.payload, None),
        Ok((Message::Announce { .. }, _))
    ));
    a.handle_datagram(t + 4, addr(2), &answer.payload);
    assert_eq!(a.peer_count(), 1);
    // The record came: the request is not sent again.
    a.handle_timeout(t + 200);
    assert!(
        !drain(&mut a).iter().any(|x| matches!(
            wire::decode(&x.payload, None),
            Ok((Message::Ping { target, .. }, _)) if target == MemberId::from_u128(2)
        )),
        "asked again after the record came"
    );
    // Known and up to date: no more asking.
    a.handle_datagram(t + 600, addr(2), &beat(&b));
    assert!(drain(&mut a).is_empty());
    // b changes its tags: a hears only a heartbeat with the new seq and asks again.
    b.set_tags(t + 700, [("k".to_string(), "v".to_string())].into())
        .unwrap();
    drain(&mut b);
    a.handle_datagram(t + 701, addr(2), &beat(&b));
    assert_eq!(drain(&mut a).len(), 1);
    // A flood of heartbeats of ever new members asks at a bounded rate.
    for i in 0..10_000u32 {
        let hb = Message::Heartbeat {
            id: MemberId::from_u128(1_000 + u128::from(i)),
            incarnation: 1,
            seq: 1,
        };
        let src = SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 9000));
        a.handle_datagram(t + 800, src, &wire::encode(&hb, None).unwrap());
    }
    assert!(drain(&mut a).len() <= 64);
    assert!(a.footprint().record_requests <= MAX_RECORD_REQUESTS);
}

/// Version 1 (JSON) datagrams are ignored, counted apart, and explained per source.
#[test]
fn version_1_datagrams_are_counted_and_explained() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    a.start(t);
    let v1 = br#"{"v":1,"m":{"type":"announce","node":{"id":"00000000-0000-0000-0000-000000000009","name":"old","inc":1,"addr":"0.0.0.0:1","role":"r","ivl":200,"ttl":900}}}"#;
    a.handle_datagram(t, addr(9), v1);
    a.handle_datagram(t + 1, addr(9), v1);
    assert_eq!(a.stats().dropped_legacy, 2);
    assert_eq!(a.peer_count(), 0);
    let seen = a.rejections(t + 2);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].reason, Refusal::OldVersion);
    assert_eq!(seen[0].name.as_deref(), Some("old"));
    assert_eq!(seen[0].count, 2);
}

/// An observer's settled time: the longest window before any answer, then its last
/// probe plus the longest window answered plus the margin; never before an answer.
#[test]
fn settled_at_follows_the_answers_reply_windows() {
    let t = 1_000_000;
    let mut obs = node(9, None, true);
    assert_eq!(obs.settled_at(), None, "not started");
    obs.start(t);
    let probe = drain(&mut obs).remove(0);
    let cfg = Config::default();
    let second = t + cfg.observer_second_probe_ms;
    let margin = |w: u64| cfg.settle_margin_ms + w / 4;
    assert_eq!(
        obs.settled_at(),
        Some(second + MAX_REPLY_WINDOW_MS + margin(MAX_REPLY_WINDOW_MS))
    );
    let mut members: Vec<Discovery> = (1..=3).map(|i| node(i, None, false)).collect();
    for (i, m) in members.iter_mut().enumerate() {
        m.start(t);
        drain(m);
        m.handle_datagram(t + 1, addr(9), &probe.payload);
        let at = m.poll_timeout().unwrap();
        m.handle_timeout(at);
        let answer = drain(m).remove(0);
        assert_eq!(answer.dest, Destination::Unicast(addr(9)));
        let Ok((
            Message::Announce {
                reply_window_ms, ..
            },
            _,
        )) = wire::decode(&answer.payload, None)
        else {
            panic!("an announcement");
        };
        assert!(at <= t + 1 + reply_window_ms, "answered within its window");
        obs.handle_datagram(at + 1, addr(i as u8 + 1), &answer.payload);
        let settled = obs.settled_at().unwrap();
        assert_eq!(settled, second + reply_window_ms + margin(reply_window_ms));
        assert!(settled > at + 1, "never before an answer");
    }
    assert_eq!(obs.peer_count(), 3);
    // An answer that says the group is bigger moves it later.
    let before = obs.settled_at().unwrap();
    obs.window_heard(400);
    assert!(obs.settled_at().unwrap() > before);
    assert!(
        obs.timers.get(Timer::SecondProbe).unwrap() >= t + 405,
        "the second probe waits for the answers"
    );
}

/// While an observer is yet to look at its last probe's answers (and maybe probe
/// again), it is not settled, whatever its margin.
#[test]
fn an_observer_is_not_settled_before_it_looks_at_its_last_probes_answers() {
    let t = 1_000_000;
    let cfg = Config {
        observer: true,
        settle_margin_ms: 0,
        ..Config::default()
    };
    let mut obs = Discovery::new(cfg, local_node(9), None, 9, t).unwrap();
    obs.start(t);
    obs.window_heard(8);
    let second = obs.timers.get(Timer::SecondProbe).unwrap();
    obs.handle_timeout(second);
    let look = obs
        .timers
        .get(Timer::ProbeAgain)
        .expect("a look at the answers");
    assert!(
        obs.settled_at().unwrap() >= look,
        "settled at {:?}, before the look at {look}",
        obs.settled_at()
    );
}

/// Observers are answered one by one within the reply window even when more
/// newcomers probe at once than are answered by unicast (the rest get a multicast
/// answer that the budget may put off).
#[test]
fn observers_are_answered_within_the_window_among_many_probes() {
    let t = 1_000_000;
    let mut m = node(1, None, false);
    m.start(t);
    drain(&mut m);
    // A multicast record just went out: a multicast answer now would be put off.
    m.announce(t, Destination::Group);
    drain(&mut m);
    for i in 10..20u128 {
        let mut newcomer = node(i, None, false);
        newcomer.start(t);
        let probe = drain(&mut newcomer).remove(0);
        m.handle_datagram(t + 1, addr(i as u8), &probe.payload);
    }
    let mut obs = node(99, None, true);
    obs.start(t);
    let probe = drain(&mut obs).remove(0);
    m.handle_datagram(t + 2, addr(99), &probe.payload);
    let window = m.reply_window();
    let mut answered_at = None;
    let mut now = t + 2;
    while now < t + 1_000 {
        now = m.poll_timeout().unwrap();
        m.handle_timeout(now);
        for x in drain(&mut m) {
            if x.dest == Destination::Unicast(addr(99)) {
                answered_at.get_or_insert(now);
            }
        }
    }
    let at = answered_at.expect("the observer got a unicast answer");
    assert!(
        at <= t + 2 + window,
        "answered at +{} ms, window {window}",
        at - t
    );
}

/// A node that wakes long after a peer's deadline (it was stalled: a busy host) does
/// not fail the peer on stale knowledge: it probes once more and looks again shortly,
/// so that what the peer sent meanwhile, still queued, counts; a peer silent through
/// that grace too is failed.
#[test]
fn a_stalled_node_gives_its_peers_a_grace_before_failing_them() {
    let t = 1_000_000;
    let (mut a, b) = a_knows_b(t);
    events(&mut a);
    let ttl = ttl_for(Config::default().min_interval_ms);
    // a sleeps through b's whole TTL; b's heartbeat sits in a's inbox meanwhile.
    let woke = t + ttl + 300;
    a.handle_timeout(woke);
    assert!(events(&mut a).is_empty(), "failed on stale knowledge");
    assert!(
        drain(&mut a)
            .iter()
            .any(|x| x.dest == Destination::Unicast(addr(2))),
        "probes b once more"
    );
    let beat = wire::encode(&b.heartbeat_message(), None).unwrap();
    a.handle_datagram(woke + 1, addr(2), &beat);
    a.handle_timeout(woke + LATE_MS);
    assert!(events(&mut a).is_empty());
    assert_eq!(a.peer_count(), 1);
    // Stalled again with b really gone: one grace, then failed.
    let woke = woke + 1 + ttl + 300;
    a.handle_timeout(woke);
    assert!(events(&mut a).is_empty());
    a.handle_timeout(woke + LATE_MS);
    assert!(matches!(&events(&mut a)[..], [PeerEvent::Failed(p)] if p.name == "n2"));
}

/// A suspect is also checked by multicast pings (no address resolution needed): the
/// target answers with one multicast datagram for all who suspect it (its record in
/// a small group, a heartbeat in a large one), which keeps it alive; other members
/// ignore a ping that is not for them.
#[test]
fn multicast_pings_check_a_suspect_and_one_answer_serves_them_all() {
    let t = 1_000_000;
    let mut a = node(1, None, false);
    let mut b = node(2, None, false);
    let mut c = node(3, None, false);
    for n in [&mut a, &mut b, &mut c] {
        n.start(t);
    }
    drain(&mut a);
    drain(&mut c);
    let probe = drain(&mut b).remove(0);
    a.handle_datagram(t, addr(2), &probe.payload);
    // b is heard no more: a suspects it and pings it by multicast.
    let (now, ping) = loop {
        let now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
        let ping = drain(&mut a).into_iter().find(|x| {
            matches!(wire::decode(&x.payload, None), Ok((Message::Ping { target, .. }, _)) if target == MemberId::from_u128(2))
        });
        if let Some(ping) = ping {
            assert_eq!(ping.dest, Destination::Group);
            break (now, ping);
        }
        assert!(now < t + 1_000, "no ping");
    };
    assert!(now >= t + 500, "pinged only once suspect: {}", now - t);
    c.handle_datagram(now, addr(1), &ping.payload);
    assert!(drain(&mut c).is_empty(), "not for c");
    b.handle_datagram(now, addr(1), &ping.payload);
    b.handle_datagram(now + 1, addr(3), &ping.payload);
    let answers = drain(&mut b);
    assert_eq!(answers.len(), 1, "one answer for both");
    assert_eq!(answers[0].dest, Destination::Group);
    // A small group answers with the record (a ping is also a request for it).
    assert!(matches!(
        wire::decode(&answers[0].payload, None),
        Ok((Message::Announce { .. }, _))
    ));
    a.handle_datagram(now + 1, addr(2), &answers[0].payload);
    assert_eq!(a.peers(now + 1)[0].state, PeerState::Alive);
}
