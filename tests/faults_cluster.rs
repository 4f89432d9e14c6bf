//! Outages: a Redis Cluster master failing over during waits, and losing
//! the last writes of a call still ringing (on a cluster
//! of the test's own, which a file lock keeps to one test process at a time),
//! and the answer travelling only to the shard that owns its key (on the
//! shared cluster, only read).
//!
//! The services broken here are the test's own: a redis-server child, a
//! Redis Cluster on ports of its own, a TCP proxy in front of PostgreSQL, an
//! FCM stand-in. The shared PostgreSQL, Redis and Redis Cluster are only
//! used, never stopped or flushed. Each outage ends with the service healthy
//! again (readiness 200) and serving a fresh call (ACK).
//!
//! Tests that need a redis-server binary or a shared service are
//! `#[ignore]`d, so a plain `cargo test` on a bare machine reports them as
//! ignored (never as passed); `.ci/run` runs them with `--include-ignored`.

mod common;

use std::time::{Duration, Instant};

use call_notifier::broker::redis::{channel, holders_key, meta_key, state_key};
use call_notifier::broker::{Phase, Record};
use common::fault::*;
use common::*;
use hyper::StatusCode;

// ---------------------------------------------------------------------------
// 3. A Redis Cluster master fails over during waits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn a_cluster_failover_during_waits_ends_every_call_by_its_wait() {
    let cluster = FaultCluster::start().await;
    let first = FAULT_CLUSTER_PORTS[0];
    let masters = masters().await;
    let victim = masters[0].clone();
    // A node that stays up, to watch the cluster through.
    let observer = *FAULT_CLUSTER_PORTS
        .iter()
        .find(|p| **p != victim.port)
        .expect("another node");
    // Keys whose slot the victim owns, and keys elsewhere.
    let (mut on_victim, mut elsewhere) = (Vec::new(), Vec::new());
    while on_victim.len() < 8 || elsewhere.len() < 2 {
        let key = call_id();
        let slot = key_slot(first, &state_key(&key)).await;
        if victim.serves(slot) {
            on_victim.push(key);
        } else if elsewhere.len() < 2 {
            elsewhere.push(key);
        }
    }
    let server = start(&Backend::embedded(), |c| {
        c.redis_url = Some(cluster.url());
        c.wait_ms = 8000;
    })
    .await;
    let wait = server.running.state.config.wait();
    let token = "tok-r3";
    let user = server.registered("android", token).await;
    ready_again(&server).await;
    assert_fresh_call_is_ack(&server, &user, token).await;

    // Four calls on the victim's shard, two elsewhere, all parked.
    let parked: Vec<String> = on_victim[..4].iter().chain(&elsewhere).cloned().collect();
    let calls: Vec<_> = parked.iter().map(|key| ring(&server, &user, key)).collect();
    let mut pushes = Vec::new();
    for key in &parked {
        pushes.push(server.call_push(token, key).await);
    }

    let killed_at = Instant::now();
    // SAFETY: kill(2) on the pid of a redis-server this test started.
    assert_eq!(
        unsafe { libc::kill(node_pid(victim.port).await, libc::SIGKILL) },
        0
    );
    let answer = |n: usize| {
        let client = server.client.clone();
        let (key, start) = (parked[n].clone(), start_time_of(&pushes[n]));
        async move { client.call_response(&key, start, true).await.status }
    };
    // The other shards never noticed.
    assert_eq!(answer(4).await, StatusCode::ACCEPTED);
    assert_eq!(answer(5).await, StatusCode::ACCEPTED);
    // Its shard is gone for now: this answer may or may not make it.
    let mut answered = vec![false; parked.len()];
    answered[4] = true;
    answered[5] = true;
    answered[0] = answer(0).await == StatusCode::ACCEPTED;

    // The replica takes over.
    let promoted = eventually(Duration::from_secs(15), || async {
        let nodes = cluster_nodes(observer).await;
        nodes.iter().any(|n| {
            n.master
                && !n.failed
                && n.port != victim.port
                && n.master_id.is_none()
                && victim.slots.iter().all(|(a, _)| n.serves(*a))
        })
    })
    .await;
    assert!(promoted, "no replica took over the victim's slots");
    eprintln!("failover of {} took {:?}", victim.port, killed_at.elapsed());
    // Answers after the failover: made it or not, the call ends by its wait.
    answered[1] = answer(1).await == StatusCode::ACCEPTED;
    // An app retries an answer that was not taken, as apps do: the cluster
    // connection needs a moment to learn the new slot owner, and within
    // 2 s of the failover one of four tries must get through.
    let mut refusals = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match answer(2).await {
            StatusCode::ACCEPTED => {
                answered[2] = true;
                break;
            }
            refused => refusals.push(refused),
        }
    }
    // parked[3] is never answered.

    for (n, call) in calls.into_iter().enumerate() {
        let (reply, took) = call.await.expect("the PBX request");
        let expected = if answered[n] {
            "status=ACK"
        } else {
            "status=NAK"
        };
        assert_eq!(
            reply.body, expected,
            "call {n} (answer accepted: {})",
            answered[n]
        );
        assert!(
            took <= wait + MARGIN,
            "call {n} took {took:?}, past its wait"
        );
    }
    eprintln!("answers accepted: {answered:?}");
    assert!(
        answered[2],
        "an answer retried for 2 s after the failover was refused: {refusals:?}"
    );

    // New calls on the failed-over shard are served.
    ready_again(&server).await;
    for key in &on_victim[4..] {
        let pbx = ring(&server, &user, key);
        let push = server.call_push(token, key).await;
        let reply = server
            .client
            .call_response(key, start_time_of(&push), true)
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
        assert_eq!(pbx.await.expect("the PBX").0.body, "status=ACK");
    }
    assert_no_bookkeeping(&server).await;
    // No subscription outlives its call, the failover's included (the redis
    // crate resubscribes on the new master what it still tracks).
    let survivors: Vec<u16> = cluster_nodes(observer)
        .await
        .into_iter()
        .filter(|n| n.master && !n.failed)
        .map(|n| n.port)
        .collect();
    let clean = eventually(Duration::from_secs(5), || {
        let survivors = survivors.clone();
        async move {
            for port in survivors {
                let channels: Vec<String> =
                    node_command(port, redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg("cn:*"))
                        .await
                        .expect("PUBSUB SHARDCHANNELS");
                if !channels.is_empty() {
                    eprintln!("left on {port}: {channels:?}");
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(clean, "sharded subscriptions left after the failover");
}

// ---------------------------------------------------------------------------
// A master paused (no connection drops, commands time out) while the other
// shards' messages are lost: the fallback check must still find them.

/// A master that stops answering drops no connection, so only its commands
/// timing out tell; and while it hangs, a fallback check that reads every
/// parked call in one multi-slot `MGET` fails as a whole. Here the paused
/// master's replica is kept from taking over, so it hangs for as long as
/// the test likes: an answer stored on a healthy shard whose message was
/// lost (written straight into Redis, as in `faults_redis.rs`) must still
/// end its call with ACK long before the wait runs out. Found by the chaos
/// run (docs/chaos.md): a cancel accepted just before a failover reached
/// its call only at the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn a_paused_master_keeps_no_other_shard_from_finding_a_lost_answer() {
    let cluster = FaultCluster::start().await;
    let first = FAULT_CLUSTER_PORTS[0];
    let nodes = cluster_nodes(first).await;
    let masters: Vec<&ClusterNode> = nodes.iter().filter(|n| n.master && !n.failed).collect();
    assert_eq!(masters.len(), 3, "{nodes:?}");
    let victim = masters[0].clone();
    let replica = nodes
        .iter()
        .find(|n| n.master_id.as_deref() == Some(victim.id.as_str()))
        .expect("the victim's replica");
    // No failover (the victim hangs until resumed), and the healthy shards
    // keep serving while its slots are uncovered.
    let no_failover = redis::cmd("CONFIG")
        .arg("SET")
        .arg("cluster-replica-no-failover")
        .arg("yes")
        .clone();
    let _: () = node_command(replica.port, &no_failover)
        .await
        .expect("CONFIG SET");
    for node in &nodes {
        let partial = redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-require-full-coverage")
            .arg("no")
            .clone();
        let _: () = node_command(node.port, &partial).await.expect("CONFIG SET");
    }
    let (mut held, mut other) = (None, None);
    while held.is_none() || other.is_none() {
        let key = call_id();
        let slot = key_slot(first, &state_key(&key)).await;
        if victim.serves(slot) {
            held.get_or_insert(key);
        } else {
            other.get_or_insert((key, slot));
        }
    }
    let (held, (other, other_slot)) = (held.expect("a key"), other.expect("a key"));
    let other_master = masters
        .iter()
        .find(|m| m.serves(other_slot))
        .expect("the other key's master")
        .port;
    let server = start(&Backend::embedded(), |c| {
        c.redis_url = Some(cluster.url());
        c.wait_ms = 10_000;
        c.poll_interval_ms = 100;
    })
    .await;
    let wait = server.running.state.config.wait();
    let token = "tok-paused";
    let user = server.registered("android", token).await;
    ready_again(&server).await;
    assert_fresh_call_is_ack(&server, &user, token).await;

    let held_call = ring(&server, &user, &held);
    let held_push = server.call_push(token, &held).await;
    let other_call = ring(&server, &user, &other);
    server.call_push(token, &other).await;

    let victim_pid = node_pid(victim.port).await;
    // SAFETY: kill(2) on the pid of a redis-server this test started.
    assert_eq!(unsafe { libc::kill(victim_pid, libc::SIGSTOP) }, 0);
    // The app answers the call on the hanging shard: nothing can store it.
    let refused = server
        .client
        .call_response(&held, start_time_of(&held_push), true)
        .await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    // The other call is answered on its healthy shard, and the message
    // is lost.
    let state: String = node_command(other_master, redis::cmd("GET").arg(state_key(&other)))
        .await
        .expect("GET");
    let mut record = Record::decode(&state).expect("a call's record");
    assert!(record.take(0, true, 0, false));
    let _: () = node_command(
        other_master,
        redis::cmd("SET")
            .arg(state_key(&other))
            .arg(record.encode())
            .arg("KEEPTTL"),
    )
    .await
    .expect("SET");
    let answered = tokio::time::timeout(wait / 2, other_call).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(victim_pid, libc::SIGCONT) }, 0);
    let (reply, _) = answered
        .expect("the lost answer was found while the master still hung")
        .expect("the PBX request");
    assert_eq!(reply.body, "status=ACK");
    // The refused answer is indeterminate, as any write that timed out:
    // it waited in the hung master's socket, which runs it on waking (ACK),
    // or the call rings out its wait (NAK). Either way, by the wait.
    let (reply, took) = held_call.await.expect("the PBX request");
    assert!(
        ["status=ACK", "status=NAK"].contains(&reply.body.as_str()),
        "{}",
        reply.body
    );
    assert!(took <= wait + MARGIN, "the held call took {took:?}");

    ready_again(&server).await;
    assert_fresh_call_is_ack(&server, &user, token).await;
}

// ---------------------------------------------------------------------------
// A node gives up a slot whose channel the server listens on, unasked.

/// A Redis Cluster node that gives up a slot drops the sharded
/// subscriptions of that slot and says so with a `sunsubscribe` push that
/// nobody asked for (a master that slept through its failover does it as
/// it wakes). The redis crate before 1.8.2 took that push for the reply to
/// the oldest command in flight on the node's connection, and from then on
/// handed each command the reply of the one before: the chaos run's 503s
/// and NAKs, for minutes after the fault. Here the node's writes are held
/// (`CLIENT PAUSE WRITE`) so that a new call's open script is in flight
/// when the slot of a parked call moves away; that call and the next ones
/// on the node must still be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn a_slot_moving_away_from_a_subscribed_node_hands_no_command_another_reply() {
    let cluster = FaultCluster::start().await;
    let first = FAULT_CLUSTER_PORTS[0];
    let masters = masters().await;
    let (from, to) = (masters[0].clone(), masters[1].clone());
    let mut on_from = Vec::new();
    while on_from.len() < 5 {
        let key = call_id();
        let slot = key_slot(first, &state_key(&key)).await;
        if from.serves(slot) && on_from.iter().all(|(_, s)| *s != slot) {
            on_from.push((key, slot));
        }
    }
    let (moved, moved_slot) = on_from.remove(0);
    let (busy, _) = on_from.remove(0);
    let server = start(&Backend::embedded(), |c| {
        c.redis_url = Some(cluster.url());
        c.wait_ms = 8000;
    })
    .await;
    let wait = server.running.state.config.wait();
    let token = "tok-moved";
    let user = server.registered("android", token).await;
    ready_again(&server).await;
    assert_fresh_call_is_ack(&server, &user, token).await;

    // A call parked on `from`: the server's connection to it holds the
    // call's subscription. Its keys go, as a migration would take them,
    // so that the slot can be given away.
    let moved_call = ring(&server, &user, &moved);
    server.call_push(token, &moved).await;
    let gone: i64 = node_command(
        from.port,
        redis::cmd("DEL")
            .arg(state_key(&moved))
            .arg(meta_key(&moved))
            .arg(holders_key(&moved)),
    )
    .await
    .expect("DEL");
    assert_eq!(gone, 3, "the moved call's record, meta and holders");

    // Writes on `from` wait (a script among them), reads and admin go on.
    let pause = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(900)
        .arg("WRITE")
        .clone();
    let () = node_command(from.port, &pause).await.expect("CLIENT PAUSE");
    let busy_call = ring(&server, &user, &busy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The slot moves away while the new call's open script is in flight:
    // `from` unsubscribes the server from the parked call's channel.
    for master in [&to, &from] {
        let give = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(moved_slot)
            .arg("NODE")
            .arg(&to.id)
            .clone();
        let () = node_command(master.port, &give)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER SETSLOT on {}: {e}", master.port));
    }
    let () = node_command(from.port, redis::cmd("CLIENT").arg("UNPAUSE"))
        .await
        .expect("CLIENT UNPAUSE");

    // The call whose open script waited, and the next ones on `from`, are
    // served as ever.
    let answered = |key: String, pbx: tokio::task::JoinHandle<(Reply, Duration)>| {
        let server = &server;
        async move {
            let push = server.call_push(token, &key).await;
            let reply = server
                .client
                .call_response(&key, start_time_of(&push), true)
                .await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{key}: {}", reply.body);
            let (pbx_reply, _) = pbx.await.expect("the PBX request");
            assert_eq!(pbx_reply.body, "status=ACK", "{key}");
        }
    };
    answered(busy, busy_call).await;
    for (key, _) in on_from {
        let pbx = ring(&server, &user, &key);
        answered(key, pbx).await;
    }
    let (_, took) = moved_call.await.expect("the PBX request");
    assert!(took <= wait + MARGIN, "the moved call took {took:?}");
    ready_again(&server).await;
}

// ---------------------------------------------------------------------------
// The answer travels only to the shard that owns its key.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs TEST_REDIS_CLUSTER_URL: run with --include-ignored, as .ci/run does"]
async fn on_a_cluster_the_answer_reaches_only_the_owning_shard() {
    let url = std::env::var("TEST_REDIS_CLUSTER_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_REDIS_CLUSTER_URL is not set (e.g. redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003; \
             .ci/run sets it and `bash .ci/redis-cluster` starts the cluster)"
        )
    });
    let hosts = url.strip_prefix("redis+cluster://").expect("a cluster URL");
    let first_port: u16 = hosts
        .split(',')
        .next()
        .and_then(|h| h.trim_end_matches('/').rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("a port in TEST_REDIS_CLUSTER_URL");
    let masters: Vec<ClusterNode> = cluster_nodes(first_port)
        .await
        .into_iter()
        .filter(|n| n.master && !n.failed && !n.slots.is_empty())
        .collect();
    assert!(masters.len() >= 2, "{masters:?}");
    // The PBX reaches one instance, the app another.
    let pbx_side = start(&Backend::embedded(), |c| c.redis_url = Some(url.clone())).await;
    let app_side = start(&Backend::embedded(), |c| c.redis_url = Some(url.clone())).await;
    let token = "tok-shard";
    let user = pbx_side.registered("android", token).await;

    let counted = ["spublish", "evalsha", "eval", "publish"];
    let calls_of = |stats: &std::collections::HashMap<String, u64>| -> u64 {
        counted
            .iter()
            .map(|c| stats.get(*c).copied().unwrap_or(0))
            .sum()
    };
    // Other tests share this cluster: a round where another master moved
    // at the same moment proves nothing, so take the first clean round.
    let mut clean_round = false;
    for round in 0..5 {
        let key = call_id();
        let slot = key_slot(first_port, &state_key(&key)).await;
        let owner = masters
            .iter()
            .find(|m| m.serves(slot))
            .expect("a master owns every slot");
        let pbx = ring(&pbx_side, &user, &key);
        let push = pbx_side.call_push(token, &key).await;
        let channel = channel(&key);
        for master in &masters {
            let (_, sharded): (String, i64) = node_command(
                master.port,
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel),
            )
            .await
            .expect("SHARDNUMSUB");
            let (_, classic): (String, i64) = node_command(
                master.port,
                redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel),
            )
            .await
            .expect("NUMSUB");
            let expected = i64::from(master.port == owner.port);
            assert_eq!(
                sharded, expected,
                "SHARDNUMSUB on {} (owner {})",
                master.port, owner.port
            );
            assert_eq!(classic, 0, "NUMSUB on {}", master.port);
        }
        let before: Vec<u64> = futures_util::future::join_all(
            masters
                .iter()
                .map(|m| async move { calls_of(&command_calls(&m.url()).await) }),
        )
        .await;
        let reply = app_side
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
        let after: Vec<u64> = futures_util::future::join_all(
            masters
                .iter()
                .map(|m| async move { calls_of(&command_calls(&m.url()).await) }),
        )
        .await;
        assert_eq!(pbx.await.expect("the PBX").0.body, "status=ACK");
        let mut others_moved = false;
        for (n, master) in masters.iter().enumerate() {
            if master.port == owner.port {
                // EVALSHA (or EVAL) and the SPUBLISH inside it.
                assert!(
                    after[n] >= before[n] + 2,
                    "the owner {} ran {} of {counted:?}",
                    master.port,
                    after[n] - before[n]
                );
            } else if after[n] != before[n] {
                others_moved = true;
            }
        }
        if !others_moved {
            clean_round = true;
            break;
        }
        eprintln!("round {round}: another master published meanwhile (other tests); again");
    }
    assert!(clean_round, "in every round another master published too");
    assert_no_bookkeeping(&pbx_side).await;
}

// ---------------------------------------------------------------------------
// A failover loses the last writes of a call still ringing.

/// Redis replicates asynchronously: the writes a master acknowledged in
/// its last moments may never reach the replica that takes its slots. For a
/// call that rang just then, that can be its record (the app's answer gets
/// 404) or its device's alias (the REGISTER of a phone its proxy woke finds
/// no call): the call would end NAK at its wait though the phone answered.
/// Here the loss is made certain: the call's record, meta and alias, all on
/// the victim's shard, are deleted there (the deletes replicate, so the
/// replica that takes over has none of them, as if the writes had never
/// reached it); then the victim dies. The instance must store the keys again
/// once the replica has taken over, and the REGISTER must answer the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn the_keys_of_a_ringing_call_a_failover_lost_are_stored_again() {
    let cluster = FaultCluster::start().await;
    let first = FAULT_CLUSTER_PORTS[0];
    let victim = masters().await[0].clone();
    let observer = *FAULT_CLUSTER_PORTS
        .iter()
        .find(|p| **p != victim.port)
        .expect("another node");
    let user = sip_user_id();
    // A call and a device whose keys are all on the victim's shard.
    let key = loop {
        let key = call_id();
        if victim.serves(key_slot(first, &state_key(&key)).await) {
            break key;
        }
    };
    let mut n = u64::from(std::process::id()) << 16;
    let (voip, alias) = loop {
        n += 1;
        let voip = format!("{n:012x}");
        let alias = format!("cn:alias:{{{user} {voip}}}");
        if victim.serves(key_slot(first, &alias).await) {
            break (voip, alias);
        }
    };
    let server = start(&Backend::embedded(), |c| {
        c.redis_url = Some(cluster.url());
        c.wait_ms = 30_000;
    })
    .await;
    ready_again(&server).await;
    let register = apns_register(&user, &voip);
    let created = server.client.post(SIP_REGISTRATION, &register).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);

    let pbx = server.client.park(&user, &key);
    server.call_push(&voip, &key).await;
    let get = |port: u16, name: String| async move {
        node_command::<Option<String>>(port, redis::cmd("GET").arg(name))
            .await
            .unwrap_or(None)
    };
    let noted = eventually(RECOVERY, || {
        let noted = get(victim.port, alias.clone());
        async move { noted.await.is_some() }
    })
    .await;
    assert!(noted, "the alias was never noted");
    for name in [state_key(&key), meta_key(&key), alias.clone()] {
        let deleted: i64 = node_command(victim.port, redis::cmd("DEL").arg(&name))
            .await
            .expect("DEL");
        assert_eq!(deleted, 1, "{name} was stored");
    }

    // SAFETY: kill(2) on the pid of a redis-server this test started.
    assert_eq!(
        unsafe { libc::kill(node_pid(victim.port).await, libc::SIGKILL) },
        0
    );
    let promoted = bounded("a replica taking the victim's slots", async {
        loop {
            let nodes = cluster_nodes(observer).await;
            if let Some(node) = nodes.iter().find(|n| {
                n.master && !n.failed && n.port != victim.port && n.serves(victim.slots[0].0)
            }) {
                return node.port;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Stored again on the promoted replica: the alias names the call, and
    // the call rings again.
    let restored = bounded("the alias stored again", async {
        loop {
            if let Some(noted) = get(promoted, alias.clone()).await {
                return noted;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(restored, key, "the alias names the call's push key");
    // Each slot is stored again in a pipeline of its own, several at once:
    // the record's and the meta's may come after the alias's.
    let record = bounded("the call's record stored again", async {
        loop {
            if let Some(record) = get(promoted, state_key(&key)).await {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let record = Record::decode(&record).expect("a record");
    assert!(matches!(record.phase, Phase::Ringing { .. }), "{record:?}");
    bounded("the call's meta stored again", async {
        while get(promoted, meta_key(&key)).await.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The phone, woken, REGISTERs: that is its answer.
    register_answers(&server, &register, pbx).await;
    ready_again(&server).await;
    assert_fresh_call_is_ack(&server, &user, &voip).await;
}
