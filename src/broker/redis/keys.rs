//! What the Redis broker writes: key and channel names, the scripts that
//! change a call's record, the published messages, and the command that
//! stores a ringing record.
//!
//! `cn:{<call key>}` holds the call's record ([`Record`]'s text),
//! `cn:{<call key>}:meta` the record's format version, the account that
//! owns the key and the call's stamp (`1 42 1733250000000`, see [`meta`]),
//! `cn:{<call key>}:holders` the hold ids of the requests that ring the
//! call (see [`holders_key`]), `cn:{<call key>}:told:<stamp>` the first
//! claim of each phone's `call_ended` notice and of each call push after
//! the first (see [`told_key`]), and
//! `cn:{<push key>}` a device's pointer to it (`to <n> <call key>`) when the
//! call rings several devices; `cn:{<call key>}:answer` is the call's
//! channel; `cn:legs:{<call_id>}` the set of leg keys opened for a Call-ID
//! that another account's call held, and `cn:cancels:{<call_id>}` the
//! [`crate::broker::cancel_mark`]s of the cancels by that Call-ID. The
//! braces are a Redis Cluster hash tag: a call's record, its meta and its
//! channel always share a slot, as do a Call-ID's legs and cancels, so each
//! script touches one slot. A key that begins with `}` is written with
//! [`TAG_ESCAPE`] before it (see [`Tag`]).
//!
//! Each script is [`crate::lifecycle`]'s transition of the same name, in
//! Lua; `tests/lifecycle_model.rs` holds them to it.

use std::fmt::{self, Display};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::broker::{
    deadline_millis, unix_millis, Answer, Message, Phase, Record, Stamp, Stored, TOMBSTONE,
};
use crate::store::{EndReason, Platform};

/// Put before a key that begins with `}`: see [`Tag`].
pub const TAG_ESCAPE: char = '\u{1}';

/// What goes between the braces of a key's Redis names: the key itself,
/// unless it begins with `}`.
///
/// Redis Cluster hashes the text between a name's first `{` and the first
/// `}` after it, and the whole name when that text is empty: `cn:{}x}` and
/// `cn:{}x}:meta` would hash to two slots, and every script on both fail
/// with CROSSSLOT (a `}` further in only shortens the tag, the same for all
/// the key's names). A SIP Call-ID may begin with `}` (RFC 3261's `word`),
/// so such a key is written after [`TAG_ESCAPE`], a control character no
/// client's key holds ([`crate::http::body`] refuses them): no two keys
/// share a name, and every other key's names stay as they always were.
struct Tag<'a>(&'a str);

impl Display for Tag<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with('}') {
            write!(f, "{TAG_ESCAPE}")?;
        }
        f.write_str(self.0)
    }
}

/// The Redis key that holds the record (or pointer) of `key`.
pub fn state_key(key: &str) -> String {
    format!("cn:{{{}}}", Tag(key))
}

/// The Redis key that holds the format version of `key`'s record and the
/// account that owns it.
pub fn meta_key(key: &str) -> String {
    format!("cn:{{{}}}:meta", Tag(key))
}

/// The Redis key (a hash) that names the requests ringing `key`'s call:
/// the one that opened it, and each PBX retry that joined it through the
/// open script (behind a load balancer, a retry seldom reaches the first
/// request's instance), each under a hold id of its own, `1` while it
/// holds the call and `0` once taken back. A hang-up takes its instance's
/// holds back, and ends the call only when none is left ([`END_SCRIPT`]'s
/// `leave`): a retry held elsewhere rings on, and its phones are not told
/// that the call is over. Missing (a record a release before it wrote, or
/// one put back after Redis lost its keys), it holds only the holds
/// stored since.
pub fn holders_key(key: &str) -> String {
    format!("cn:{{{}}}:holders", Tag(key))
}

/// The Redis key (a hash) of the `call_ended` notices and numbered call
/// pushes claimed in `key`'s call stamped `stamp`: by each phone's push
/// token (and the push's number), the first of the call's requests'
/// claims of it ([`TOLD_SCRIPT`]). In the
/// call's slot; kept until the call's tombstone would be gone
/// ([`crate::broker::PhoneClaim::kept`]).
pub fn told_key(key: &str, stamp: Stamp) -> String {
    format!("cn:{{{}}}:told:{stamp}", Tag(key))
}

/// The format of the records this release writes. Format 0 is the record
/// alone, as 0.2.0 wrote it (no meta key); format 1 adds the meta key and
/// stores the record's text unchanged, so 0.2.0 reads format 1's records
/// and this release reads 0.2.0's (a record without meta is any account's;
/// its stamp is its deadline, as every record's). A release that changes
/// the record's text
/// must still read the format before it, and write what the release
/// before it reads (README, "Upgrading").
pub const FORMAT: u32 = 1;

/// The meta key's value: the format, the owning account and the call's
/// stamp, its record's deadline: kept with the tombstone, so the next
/// call's open knows the stamp it must pass ([`crate::broker::next_stamp`]).
/// [`OPEN_SCRIPT`] adds a fourth word, when the call opened; a meta
/// without it (a restored one, or one a release before wrote) holds no
/// answer to that rule.
pub fn meta(account: i64, stamp: Stamp) -> String {
    format!("{FORMAT} {account} {stamp}")
}

/// What [`OPEN_SCRIPT`] is given to write as the meta: the format and
/// the account; it adds the stamp.
fn meta_prefix(account: i64) -> String {
    format!("{FORMAT} {account}")
}

/// The stamp of the call `record` is: a live record's deadline, or for a
/// tombstone the stamp its `meta` kept (none without one, as 0.2.0 wrote).
pub(super) fn stamp_of(record: &Record, meta: Option<&str>) -> Option<Stamp> {
    match record.phase {
        Phase::Ringing { until } | Phase::Won { until } => Some(until),
        Phase::Ended(_) => meta?.split(' ').nth(2).and_then(parse_stamp),
    }
}

/// The stamp `text` names; `None` for text no script writes.
pub(super) fn parse_stamp(text: &str) -> Option<Stamp> {
    text.parse().ok()
}

/// The owning account a meta value names, whatever its format.
pub fn owner_of(meta: &str) -> Option<i64> {
    meta.split(' ').nth(1)?.parse().ok()
}

/// The Redis key of the set of leg keys opened for the Call-ID `call_id`.
pub fn legs_key(call_id: &str) -> String {
    format!("cn:legs:{{{}}}", Tag(call_id))
}

/// The Redis key of the set of cancel marks left under the Call-ID
/// `call_id` ([`crate::broker::CANCEL_REACH`]).
pub fn cancels_key(call_id: &str) -> String {
    format!("cn:cancels:{{{}}}", Tag(call_id))
}

/// The Redis key that holds the push key a device's alias rings under.
pub fn alias_key(alias: &str) -> String {
    format!("cn:alias:{{{}}}", Tag(alias))
}

/// `SET cn:alias:{alias} <push key> PX <ttl>`: see [`crate::broker::CallBroker::alias`].
pub(super) fn set_alias(alias: &str, key: &str, until: Instant) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(alias_key(alias))
        .arg(key)
        .arg("PX")
        .arg(ttl_millis(until));
    cmd
}

/// The channel a call's news is published on.
pub fn channel(key: &str) -> String {
    format!("cn:{{{}}}:answer", Tag(key))
}

/// The key a channel carries news for.
pub(super) fn key_of_channel(channel: &str) -> Option<&str> {
    let tag = channel.strip_prefix("cn:{")?.strip_suffix("}:answer")?;
    Some(match tag.strip_prefix(TAG_ESCAPE) {
        Some(key) if key.starts_with('}') => key,
        _ => tag,
    })
}

/// Milliseconds from now to `until` and a tombstone's life past it: how
/// long a call's record and pointers live. A crashed holder leaves nothing
/// behind for long.
fn ttl_millis(until: Instant) -> u64 {
    let ttl = until.saturating_duration_since(Instant::now()) + TOMBSTONE;
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// `SET <name> <value> PX <ttl until `until` and a tombstone> NX`:
/// stores a value unless Redis has one (an answered or ended call must
/// never ring again). What a subscriber that reconnects puts back.
pub fn set_missing(name: String, value: String, until: Instant) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(name)
        .arg(value)
        .arg("PX")
        .arg(ttl_millis(until))
        .arg("NX");
    cmd
}

/// A ringing record for `devices` until `until`, where Redis has none:
/// see [`set_missing`].
pub fn set_pending(key: &str, devices: &[Platform], until: Instant) -> redis::Cmd {
    let record = Record::ringing(devices, deadline_millis(until)).encode();
    set_missing(state_key(key), record, until)
}

/// Opens a call ([`crate::lifecycle::claim`]): KEYS[1] the record, KEYS[2]
/// its meta, KEYS[3] its holders ([`holders_key`]), KEYS[4] the cancel
/// marks left under the key ([`cancels_key`]); ARGV[1] the ringing
/// record, ARGV[2] its TTL, ARGV[3] the account, ARGV[4] the meta to store
/// but its stamp, ARGV[5] the record's deadline, ARGV[6] the request's hold
/// id, ARGV[7] `1` when the key is the one the call asked for (its
/// `call_id`; a leg's key is checked by [`LEG_SCRIPT`]), ARGV[8] when the
/// call opens (Unix ms, the meta's last word: see [`ANSWER_SCRIPT`]). Returns `new
/// <stamp>` (stored, under that stamp: the deadline, or one ms past the
/// stamp of the call the key held, as [`crate::broker::next_stamp`]; so
/// risen, the record's deadline may lie past its holder's own wait, and an
/// answer then counts until the holder's timer ends the call), `new <stamp>
/// cancelled` (stored where the key held no call a cancel ended, and a cancel for every
/// account or this one marked it: the request crossed the cancel, and the
/// call is to end as it opens, see [`crate::broker::CANCEL_REACH`]), `new
/// <stamp> anew` (stored where the key held a call the PBX's cancel ended:
/// that cancel found it, so no mark reaches the call after it, a leg's
/// neither), `join <stamp>`
/// (this account's call rings there: phase `ring` with a device yet to
/// answer, a word without `+` or `-`, every platform's name ending in a
/// letter; its hold added; followed by ` <opened>` where the meta says when
/// the call opened) or `taken` (another account's call, or a
/// device pointer: not this call's key). A record without meta, written by
/// a release that stored none, counts as this account's.
pub(super) const OPEN_SCRIPT: &str = r#"
local before = redis.call('GET', KEYS[1])
local last
if before then
  if string.sub(before, 1, 3) == 'to ' then return 'taken' end
  local meta = redis.call('GET', KEYS[2])
  local owner = meta and string.match(meta, '^%S+ (%S+)')
  if owner and owner ~= ARGV[3] then return 'taken' end
  local phase, deadline, devices = string.match(before, '^(%S+) (%S+) (.*)$')
  if phase == 'ring' and string.find(devices .. ' ', '%a ') then
    redis.call('HSETNX', KEYS[3], ARGV[6], '1')
    if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[2]) then
      redis.call('PEXPIRE', KEYS[3], ARGV[2])
    end
    local opened = meta and string.match(meta, '^%S+ %S+ %S+ (%S+)')
    return 'join ' .. deadline .. (opened and ' ' .. opened or '')
  end
  last = tonumber(phase ~= 'ended' and deadline or meta and string.match(meta, '^%S+ %S+ (%S+)'))
end
local record, stamp = ARGV[1], ARGV[5]
if last and last >= tonumber(stamp) then
  stamp = string.format('%d', last + 1)
  record = 'ring ' .. stamp .. string.sub(record, #ARGV[5] + 6)
end
redis.call('SET', KEYS[1], record, 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[4] .. ' ' .. stamp .. ' ' .. ARGV[8], 'PX', ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], ARGV[6], '1')
redis.call('PEXPIRE', KEYS[3], ARGV[2])
if before and string.find(before, '^ended cancelled ') then return 'new ' .. stamp .. ' anew' end
if ARGV[7] == '1' and (redis.call('SISMEMBER', KEYS[4], '*') == 1
    or redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1) then
  return 'new ' .. stamp .. ' cancelled'
end
return 'new ' .. stamp
"#;

/// The arguments of [`OPEN_SCRIPT`] for `account`'s call, opened by the
/// request whose hold id is `hold`, under the key it asked for (`asked`)
/// or a leg's: ARGV[1] to ARGV[8].
pub(super) fn open_args(
    account: i64,
    devices: &[Platform],
    until: Instant,
    hold: &str,
    asked: bool,
) -> [String; 8] {
    let deadline = deadline_millis(until);
    [
        Record::ringing(devices, deadline).encode(),
        ttl_millis(until).to_string(),
        account.to_string(),
        meta_prefix(account),
        deadline.to_string(),
        hold.to_owned(),
        (if asked { "1" } else { "0" }).to_owned(),
        unix_millis(SystemTime::now()).to_string(),
    ]
}

/// Device `index`'s pointer to its call, stored unless the push key holds
/// something already (`SET … NX GET`, Redis 7): the reply is `nil` when it
/// was stored, else what the key holds (the same pointer for a call being
/// joined; anything else means the key is another call's).
pub(super) fn claim_pointer(
    push_key: &str,
    call: &str,
    index: usize,
    until: Instant,
) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(state_key(push_key))
        .arg(Stored::pointer(call, index))
        .arg("PX")
        .arg(ttl_millis(until))
        .arg("NX")
        .arg("GET");
    cmd
}

/// Notes the leg ARGV[1] in the Call-ID's legs (KEYS[1]) for a cancel by
/// it, as long as the leg's record lives (ARGV[2] ms), and says (1)
/// whether a cancel already marked the Call-ID (KEYS[2]) for every account
/// (`*`) or for the leg's (ARGV[3]). One step with [`CANCEL_SCRIPT`]'s on
/// the same slot: a cancel either finds the leg or leaves the mark it
/// finds.
pub(super) const LEG_SCRIPT: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('SISMEMBER', KEYS[2], '*') == 1 then return 1 end
return redis.call('SISMEMBER', KEYS[2], ARGV[3])
"#;

/// [`LEG_SCRIPT`]'s notes without its check, as plain commands: what a
/// subscriber that reconnects puts back for a leg parked here (a Redis
/// that lost its keys lost its scripts too).
pub(super) fn note_leg(call_id: &str, leg: &str, until: Instant) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("SADD")
        .arg(legs_key(call_id))
        .arg(leg)
        .ignore()
        .cmd("PEXPIRE")
        .arg(legs_key(call_id))
        .arg(ttl_millis(until))
        .ignore();
    pipe
}

/// [`LEG_SCRIPT`]'s keys and arguments for `leg` of `account` under
/// `call_id`.
pub(super) fn add_leg(
    call_id: &str,
    leg: &str,
    account: i64,
    until: Instant,
) -> ([String; 2], [String; 3]) {
    (
        [legs_key(call_id), cancels_key(call_id)],
        [
            leg.to_owned(),
            ttl_millis(until).to_string(),
            account.to_string(),
        ],
    )
}

/// Leaves a cancel's mark ARGV[1] under the Call-ID (KEYS[1]) for ARGV[2]
/// ms and returns the legs opened for it (KEYS[2]), in one step (see
/// [`LEG_SCRIPT`]).
pub(super) const CANCEL_SCRIPT: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('SMEMBERS', KEYS[2])
"#;

/// [`CANCEL_SCRIPT`]'s keys and arguments for a cancel by `call_id`,
/// limited to `account` when given.
pub(super) fn cancel(call_id: &str, account: Option<i64>) -> ([String; 2], [String; 2]) {
    let reach = crate::broker::CANCEL_REACH.as_millis().to_string();
    (
        [cancels_key(call_id), legs_key(call_id)],
        [crate::broker::cancel_mark(account), reach],
    )
}

/// Takes device ARGV[1]'s (from 1) answer (ARGV[2]: `+` available, `-`
/// not) and publishes it (ARGV[5]: `PUBLISH`, or `SPUBLISH` on a cluster,
/// ARGV[4] and the call's stamp, its deadline, on channel ARGV[3]):
/// exactly [`Record::take`], atomic, in one round trip. ARGV[6] `1`: the key was given as it is, so it must be a
/// lone device's call (a call rung on several devices is answered only
/// through its devices' keys). ARGV[7] `1`: the answer is stale and never
/// counts. ARGV[8]: now, the answering instance's clock in Unix ms, held
/// against the deadline the opening instance wrote, as the in-process
/// broker does. ARGV[9] (absent: not said): when the answer's push says it
/// was sent, plus [`crate::broker::ECHO_MARGIN_MS`], and ARGV[10] that
/// plus the answering instance's wait; before the record's deadline, and
/// ARGV[9] before the call's opening too (the last word of its meta,
/// KEYS[2], read only then), the answer is another call's under the same
/// key and never counts ([`crate::broker::pushed_before`]). Returns `1` or `0` (counted or not) followed by the record
/// before, `0` and the pointer for a pointer, nil when there is nothing.
///
/// It runs between the app's answer and the PBX's ACK, and Redis runs it
/// cold after an idle spell, so it is written for that (SLOWLOG after
/// 0-200 ms idle, p50: 91 µs as it was, 75 µs so, the floor's script 72
/// µs; `docs/performance.md`, "The answer script, cold in Redis"): the
/// record is read in place with plain `string.find` rather than split
/// into a table by a pattern, the reply is one string rather than an
/// array, and no `TIME` call, a command of its own.
pub(super) const ANSWER_SCRIPT: &str = r#"
local before = redis.call('GET', KEYS[1])
if not before then return false end
if string.sub(before, 1, 3) == 'to ' then return '0' .. before end
-- The record's words: phase, deadline, then one per device.
local function gap(from) return string.find(before, ' ', from, true) end
local phase_end = gap(1)
local deadline_end = phase_end and gap(phase_end + 1)
-- As given: exactly three words, one device.
if ARGV[6] == '1' and (not deadline_end or gap(deadline_end + 1)) then return false end
if not deadline_end then return '0' .. before end
-- Device ARGV[1]'s word: first to last.
local first = deadline_end + 1
for _ = 2, tonumber(ARGV[1]) do
  local next_gap = gap(first)
  if not next_gap then return '0' .. before end
  first = next_gap + 1
end
local last = gap(first)
last = last and last - 1 or #before
if last < first or string.sub(before, 1, phase_end - 1) ~= 'ring' then return '0' .. before end
local mark = string.sub(before, last, last)
if mark == '+' or mark == '-' or ARGV[7] == '1' then return '0' .. before end
local deadline = tonumber(string.sub(before, phase_end + 1, deadline_end - 1))
if tonumber(ARGV[8]) >= deadline then return '0' .. before end
if ARGV[10] and tonumber(ARGV[10]) < deadline then
  local meta = redis.call('GET', KEYS[2])
  local opened = meta and string.match(meta, '^%S+ %S+ %S+ (%S+)')
  if opened and tonumber(ARGV[9]) < tonumber(opened) then return '0' .. before end
end
local phase = ARGV[2] == '+' and 'won' or 'ring'
redis.call('SET', KEYS[1], phase .. string.sub(before, phase_end, last) .. ARGV[2]
  .. string.sub(before, last + 1), 'KEEPTTL')
redis.call(ARGV[5], ARGV[3], ARGV[4] .. ' ' .. string.sub(before, phase_end + 1, deadline_end - 1))
return '1' .. before
"#;

/// [`ANSWER_SCRIPT`]'s reply: whether the answer counted, and the record
/// (or pointer) before it. `None` for a reply it never gives.
pub(super) fn split_answer(reply: &str) -> Option<(bool, &str)> {
    match reply.split_at_checked(1)? {
        ("1", before) => Some((true, before)),
        ("0", before) => Some((false, before)),
        _ => None,
    }
}

/// Ends a call: exactly [`Record::end`], its record (KEYS[1]) and meta
/// (KEYS[2]) kept ARGV[2] ms as a tombstone; only the call stamped ARGV[8]
/// when that is not empty (a newer call under the key is not the ender's):
/// a live record's stamp is its deadline, a tombstone's is in its meta.
///
/// ARGV[3] says whose end it is:
/// - `end`: the holder's (its wait ran out, an answer won, shutdown).
/// - `leave`: a hang-up, by an instance whose holds on the call are
///   ARGV[9] onwards ([`holders_key`]): they are marked taken back (`0`,
///   so an open script that runs late, retried inside the client after
///   its caller gave up, cannot add one again), and a ringing call ends
///   only if no hold is left; else the reply is `held`, and the call
///   rings on for a PBX retry parked on another instance. A leave that
///   names no call (ARGV[8] empty: an open that failed) and took back no
///   hold of its own ends nothing: the holds of the call's holder may have
///   been lost with Redis's keys, and its call is not this one's to end.
/// - `cancel`: exactly [`Record::cancel`]: only a ringing call ends, as
///   `cancelled`, and the end is published (ARGV[6] ARGV[5] and the call's
///   stamp, on channel ARGV[4]) to wake its holders.
///
/// A `leave` or a `cancel` touches only the call of account ARGV[7] when
/// that is not empty. Returns the record before (`held`, see above), nil
/// when none (or another account's, or another call's).
pub(super) const END_SCRIPT: &str = r#"
local before = redis.call('GET', KEYS[1])
if not before or string.sub(before, 1, 3) == 'to ' then return false end
local phase, stamp, rest = string.match(before, '^(%S+) (%S+)(.*)$')
if phase == 'ended' then
  if ARGV[8] ~= '' then
    local meta = redis.call('GET', KEYS[2])
    local ended = meta and string.match(meta, '^%S+ %S+ (%S+)')
    if ended and ended ~= ARGV[8] then return false end
  end
  return before
end
if ARGV[8] ~= '' and stamp ~= ARGV[8] then return false end
if ARGV[3] ~= 'end' and ARGV[7] ~= '' then
  local meta = redis.call('GET', KEYS[2])
  local owner = meta and string.match(meta, '^%S+ (%S+)')
  if owner and owner ~= ARGV[7] then return false end
end
local reason = ARGV[1]
if ARGV[3] == 'cancel' then
  if phase ~= 'ring' then return before end
  redis.call(ARGV[6], ARGV[4], ARGV[5] .. ' ' .. stamp)
elseif phase == 'won' then
  reason = 'answered_elsewhere'
elseif ARGV[3] == 'leave' then
  local mine = false
  for i = 9, #ARGV do
    mine = redis.call('HGET', KEYS[3], ARGV[i]) == '1' or mine
    redis.call('HSET', KEYS[3], ARGV[i], '0')
  end
  local held = not mine and ARGV[8] == ''
  for _, hold in ipairs(redis.call('HVALS', KEYS[3])) do
    held = held or hold == '1'
  end
  if held then
    redis.call('PEXPIRE', KEYS[3], math.max(redis.call('PTTL', KEYS[1]), 1))
    return 'held'
  end
end
redis.call('SET', KEYS[1], 'ended ' .. reason .. rest, 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return before
"#;

/// Claims a phone's `call_ended` notice, or one numbered call push to it
/// ([`crate::broker::CallBroker::claim`]): in the hash KEYS[1]
/// ([`told_key`]), the first claim of ARGV[1] (the push token, or
/// `<token> <attempt>`; [`crate::broker::PhoneClaim`]), ARGV[2] being
/// the claim: when it was made (Unix µs), an id of its own and the push
/// key its request rang the phone under, spaced; the hash kept ARGV[3] ms. Returns the first claim, nil when this one is the
/// first. A claim that finds itself is the first: the client sends a
/// script again when the connection dropped before its reply, and that
/// claim must not read its own run as another request's (its phone would
/// go untold). The id tells apart two claims made in the same
/// microsecond, as two instances whose calls time out together make them.
pub(super) const TOLD_SCRIPT: &str = r#"
local first = redis.call('HGET', KEYS[1], ARGV[1])
if first == ARGV[2] then return false end
if first then return first end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return false
"#;

/// The tombstone's life, for [`END_SCRIPT`].
pub(super) fn tombstone_millis() -> u64 {
    u64::try_from(TOMBSTONE.as_millis()).unwrap_or(u64::MAX)
}

/// An answer: the device's number from 1, `1` or `0` for available, and
/// when the answer reached us in Unix microseconds (for the wake-up latency
/// metric), spaced. The answer script adds the call's stamp: a release
/// before stamps reads the three words it knows and ignores it.
pub(super) fn encode_answer(index: usize, available: bool, at: SystemTime) -> String {
    let micros = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{} {} {micros}", index + 1, u8::from(available))
}

/// An end: `end <reason>`, to which the end script adds the call's stamp.
pub(super) fn encode_end(reason: EndReason) -> String {
    format!("end {reason}")
}

/// A published message, and the stamp of the call it is for (`None` from
/// a release before stamps).
pub(super) fn decode_message(payload: &[u8]) -> Option<(Message, Option<Stamp>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut words = text.split(' ');
    let first = words.next()?;
    if first == "end" {
        let reason = EndReason::parse(words.next()?)?;
        let stamp = words.next().and_then(parse_stamp);
        return Some((Message::Ended(reason), stamp));
    }
    let index = first.parse::<usize>().ok()?.checked_sub(1)?;
    let available = match words.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let received_at = words
        .next()
        .and_then(|m| m.parse::<u64>().ok())
        .map(|m| UNIX_EPOCH + Duration::from_micros(m));
    let stamp = words.next().and_then(parse_stamp);
    let answer = Answer {
        available,
        received_at,
    };
    Some((Message::Answer { index, answer }, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_replies_say_whether_it_counted_then_the_record() {
        assert_eq!(
            split_answer("1ring 17 android+"),
            Some((true, "ring 17 android+"))
        );
        assert_eq!(split_answer("0to 2 call"), Some((false, "to 2 call")));
        for unknown in ["", "2ring 17 android", "é"] {
            assert_eq!(split_answer(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn a_meta_names_its_owner_and_its_calls_stamp() {
        let meta = meta(42, 1_733_250_000_000);
        assert_eq!(meta, "1 42 1733250000000");
        assert_eq!(owner_of(&meta), Some(42));
        assert_eq!(owner_of("1 42"), Some(42), "before stamps");
        assert_eq!(parse_stamp("1733250000000"), Some(1_733_250_000_000));
        assert_eq!(parse_stamp(""), None);
        let mut record = Record::ringing(&[Platform::Android], 17);
        assert_eq!(stamp_of(&record, Some("1 42 5")), Some(17), "its deadline");
        record.end(EndReason::Cancelled);
        assert_eq!(
            stamp_of(&record, Some("1 42 17")),
            Some(17),
            "kept in the meta"
        );
        assert_eq!(stamp_of(&record, Some("1 42")), None);
        assert_eq!(stamp_of(&record, None), None);
    }

    #[test]
    fn messages_carry_the_answer_its_device_and_when_it_came() {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let answer = Message::Answer {
            index: 2,
            answer: Answer {
                available: true,
                received_at: Some(at),
            },
        };
        let published = encode_answer(2, true, at);
        assert_eq!(decode_message(published.as_bytes()), Some((answer, None)));
        let stamped = format!("{published} 7");
        assert_eq!(decode_message(stamped.as_bytes()), Some((answer, Some(7))));
        let end = encode_end(EndReason::Cancelled);
        let ended = Message::Ended(EndReason::Cancelled);
        assert_eq!(decode_message(end.as_bytes()), Some((ended, None)));
        let stamped = format!("{end} 7");
        assert_eq!(decode_message(stamped.as_bytes()), Some((ended, Some(7))));
        for bad in ["maybe", "0 1 5", "1 2 5", "end soon", ""] {
            assert_eq!(decode_message(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn channel_names_give_back_their_key() {
        for key in ["abc", "with:colon", "{braced}", "", "}x", "}", "a}b"] {
            assert_eq!(key_of_channel(&channel(key)), Some(key));
        }
        assert_eq!(key_of_channel("other"), None);
    }

    /// Keys a Cluster could not run a script on before (`}x`: its names
    /// hashed whole, each to a slot of its own) and keys whose names never
    /// changed, side by side.
    #[test]
    fn every_name_of_a_key_shares_its_slot_and_ordinary_names_stay() {
        use super::super::direct::slot;
        for key in ["abc", "}x", "}", "}}", "a}b", "{", "x{y}z", "{braced}", "~"] {
            let record = slot(state_key(key).as_bytes());
            for name in [meta_key(key), channel(key)] {
                assert_eq!(slot(name.as_bytes()), record, "{name:?} of {key:?}");
            }
            assert_eq!(
                slot(legs_key(key).as_bytes()),
                slot(cancels_key(key).as_bytes()),
                "{key:?}"
            );
        }
        assert_eq!(state_key("abc"), "cn:{abc}");
        assert_eq!(meta_key("a}b"), "cn:{a}b}:meta");
        assert_eq!(legs_key("cid@pbx"), "cn:legs:{cid@pbx}");
        assert_eq!(state_key("}x"), "cn:{\u{1}}x}");
        // No key a client can send is written like the escaped one.
        assert_ne!(state_key("}x"), state_key("\t}x"));
    }
}
