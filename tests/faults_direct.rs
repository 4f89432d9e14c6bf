//! The answer script's short way to a Redis Cluster master (a connection
//! the answering handler drives itself, `src/broker/redis/direct.rs`) and
//! each of its detours: a `MOVED` after a resharding, an `ASK` while the
//! call's slot migrates, and a connection Redis dropped. Each answer must
//! still count, and the PBX hear `status=ACK`.
//!
//! On a cluster of the test's own (127.0.0.1:7101-7106, one test process
//! at a time by its file lock), which these tests reshard and whose clients
//! they kill. `#[ignore]`d like every fault test: `.ci/run` runs them with
//! `--include-ignored`.

mod common;

use std::time::Duration;

use call_notifier::broker::redis::state_key;
use common::fault::*;
use common::*;
use hyper::StatusCode;

/// What `src/broker/redis/direct.rs` names its connections.
const DIRECT_CLIENT: &str = "call-notifier-answers";

/// The ids of the short way's connections on the node at `port`.
async fn direct_clients(port: u16) -> Vec<String> {
    let list: String = node_command(port, redis::cmd("CLIENT").arg("LIST"))
        .await
        .expect("CLIENT LIST");
    list.lines()
        .filter(|line| {
            line.split_whitespace()
                .any(|f| f == format!("name={DIRECT_CLIENT}"))
        })
        .filter_map(|line| line.split_whitespace().next()?.strip_prefix("id="))
        .map(str::to_owned)
        .collect()
}

/// `EVALSHA`s the node at `port` refused before running them (a
/// redirection is one).
async fn evalsha_refused(port: u16) -> u64 {
    let info: String = node_command(port, redis::cmd("INFO").arg("commandstats"))
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|s| s.strip_prefix("rejected_calls="))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A server on the cluster whose answers take the short way: calls are
/// answered until every master holds one of its direct connections.
async fn warmed_up(cluster: &FaultCluster, token: &str) -> (TestServer, String) {
    let server = start(&Backend::embedded(), |c| {
        c.redis_url = Some(cluster.url());
        c.wait_ms = 8000;
    })
    .await;
    let user = server.registered("android", token).await;
    for _ in 0..60 {
        assert_fresh_call_is_ack(&server, &user, token).await;
        let mut everywhere = true;
        for master in masters().await {
            everywhere &= !direct_clients(master.port).await.is_empty();
        }
        if everywhere {
            return (server, user);
        }
    }
    panic!("after 60 answered calls, some master holds no connection named {DIRECT_CLIENT}");
}

/// A call key whose slot `master` serves, and the slot.
async fn key_on(master: &ClusterNode) -> (String, u16) {
    loop {
        let key = call_id();
        let slot = key_slot(master.port, &state_key(&key)).await;
        if master.serves(slot) {
            return (key, slot);
        }
    }
}

/// Starts moving `slot` from `from` to `to` and moves its keys: from now
/// on `from` answers a command on them `ASK`.
async fn migrate_keys(slot: u16, from: &ClusterNode, to: &ClusterNode) {
    let set = |port: u16, state: &'static str, id: String| async move {
        let () = node_command(
            port,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id),
        )
        .await
        .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} on {port}: {e}"));
    };
    set(to.port, "IMPORTING", from.id.clone()).await;
    set(from.port, "MIGRATING", to.id.clone()).await;
    let keys: Vec<String> = node_command(
        from.port,
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100),
    )
    .await
    .expect("GETKEYSINSLOT");
    assert!(!keys.is_empty(), "the call's record lives in slot {slot}");
    let () = node_command(
        from.port,
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to.port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys),
    )
    .await
    .expect("MIGRATE");
}

/// Gives `slot` to `to` on every master: from now on its old owner answers
/// `MOVED`.
async fn finish_migration(slot: u16, to: &ClusterNode) {
    for master in masters().await {
        let () = node_command(
            master.port,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to.id),
        )
        .await
        .expect("CLUSTER SETSLOT NODE");
    }
}

/// Rings `key`, runs `between` once its push is out, answers, and checks
/// the answer counted (202) and the PBX heard ACK.
async fn answered_after(
    server: &TestServer,
    user: &str,
    token: &str,
    key: &str,
    between: impl std::future::Future<Output = ()>,
) {
    let pbx = ring(server, user, key);
    let push = server.call_push(token, key).await;
    between.await;
    let reply = server
        .client
        .call_response(key, start_time_of(&push), true)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let (pbx, _) = tokio::time::timeout(Duration::from_secs(10), pbx)
        .await
        .expect("the PBX heard back")
        .expect("the PBX request");
    assert_eq!(pbx.body, "status=ACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn an_answer_after_a_resharding_follows_the_moved_redirection() {
    let cluster = FaultCluster::start().await;
    let token = "tok-moved";
    let (server, user) = warmed_up(&cluster, token).await;
    let masters = masters().await;
    let (from, to) = (&masters[0], &masters[1]);
    let (key, slot) = key_on(from).await;
    let refused = evalsha_refused(from.port).await;
    answered_after(&server, &user, token, &key, async {
        migrate_keys(slot, from, to).await;
        finish_migration(slot, to).await;
    })
    .await;
    assert!(
        evalsha_refused(from.port).await > refused,
        "the short way sent the answer to the slot's old master, which redirected it"
    );
    // The slot map is read again: the next answer to a call in that slot
    // goes straight to its new master.
    let key = (0..)
        .map(|n| format!("{key}-{n}"))
        .find(|k| crc16::State::<crc16::XMODEM>::calculate(k.as_bytes()) % 16384 == slot)
        .expect("a key in the slot");
    assert_eq!(key_slot(to.port, &state_key(&key)).await, slot);
    let refused = evalsha_refused(from.port).await;
    answered_after(&server, &user, token, &key, async {}).await;
    assert_eq!(evalsha_refused(from.port).await, refused);
    assert_fresh_call_is_ack(&server, &user, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn an_answer_during_a_slot_migration_follows_the_ask_redirection() {
    let cluster = FaultCluster::start().await;
    let token = "tok-ask";
    let (server, user) = warmed_up(&cluster, token).await;
    let masters = masters().await;
    let (from, to) = (&masters[0], &masters[1]);
    let (key, slot) = key_on(from).await;
    let refused = evalsha_refused(from.port).await;
    answered_after(&server, &user, token, &key, migrate_keys(slot, from, to)).await;
    assert!(
        evalsha_refused(from.port).await > refused,
        "the short way sent the answer to the migrating master, which redirected it"
    );
    finish_migration(slot, to).await;
    assert_fresh_call_is_ack(&server, &user, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own Redis Cluster on 127.0.0.1:7101-7106: run with --include-ignored, as .ci/run does"]
async fn an_answer_on_a_dropped_direct_connection_still_counts() {
    let cluster = FaultCluster::start().await;
    let token = "tok-dropped";
    let (server, user) = warmed_up(&cluster, token).await;
    let masters = masters().await;
    let (key, _) = key_on(&masters[0]).await;
    answered_after(&server, &user, token, &key, async {
        for master in &masters {
            for id in direct_clients(master.port).await {
                let _: redis::Value = node_command(
                    master.port,
                    redis::cmd("CLIENT").arg("KILL").arg("ID").arg(&id),
                )
                .await
                .expect("CLIENT KILL");
            }
            assert!(direct_clients(master.port).await.is_empty());
        }
    })
    .await;
    // The short way connects again.
    for _ in 0..60 {
        assert_fresh_call_is_ack(&server, &user, token).await;
        if !direct_clients(masters[0].port).await.is_empty() {
            return;
        }
    }
    panic!("no new connection named {DIRECT_CLIENT} after the old ones were killed");
}
