//! Every query of the [`Store`], written once in `diesel_store!` and
//! expanded for each backend's connection type, with the few pieces that
//! differ per backend (the account lock, the batched insert).

use super::*;

/// Expands the one text of every query for one backend's connection type.
///
/// `$transaction` opens the transaction a registration runs in, and
/// `$lock_account` takes the account's lock as its first statement: together
/// they make a registration's read of the account and its writes one step,
/// so racing registrations cannot both add a device to a full account.
/// `$append` is the macro that runs a batch's one multi-row `INSERT`
/// (`append_pg`, `append_sqlite`).
macro_rules! diesel_store {
    ($name:ident, $conn:ty, $transaction:ident, $lock_account:path, $append:ident) => {
        /// The [`Store`] over one diesel-async backend.
        pub struct $name {
            /// Connections for reads.
            pub(super) read: Pool<$conn>,
            /// Connections for writes (one, for SQLite; see the module doc).
            pub(super) write: Pool<$conn>,
            /// Whether the database answers connection attempts; shared by both pools.
            pub(super) reach: Reachability,
        }

        impl $name {
            /// The devices of `rows` that have not expired. Expired ones (a
            /// SIP proxy registered them, and their registration lapsed
            /// more than its grace ago) are deleted as they are found: no
            /// sweeper task, and a row is never pushed past its expiry. A
            /// refresh racing the delete wins: only rows still expired go.
            /// The delete failing costs nothing but the row staying a
            /// while longer, so it is logged, not returned.
            async fn live(&self, rows: Vec<Device>) -> Vec<Device> {
                let now = now_millis();
                let (expired, live): (Vec<Device>, Vec<Device>) = rows
                    .into_iter()
                    .partition(|d| d.registration.expired(now));
                if expired.is_empty() {
                    return live;
                }
                let ids: Vec<i64> = expired.iter().map(|d| d.id).collect();
                let deleted = match checkout(&self.reach, &self.write).await {
                    Ok(mut conn) => diesel::delete(
                        devices::table
                            .filter(devices::id.eq_any(&ids))
                            .filter(devices::expires_at.le(now)),
                    )
                    .execute(&mut conn)
                    .await
                    .map_err(query_error),
                    Err(e) => Err(e),
                };
                match deleted {
                    Ok(n) => tracing::info!(deleted = n, "expired SIP-registered devices removed"),
                    Err(e) => tracing::warn!(error = %e, "cannot remove expired devices"),
                }
                live
            }
        }

        #[async_trait]
        impl Store for $name {
            async fn device(&self, sip_user_id: i64) -> Result<Option<Device>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                // The account's few rows (at most the limit, 20), newest
                // last: no `LIMIT ?`, whose re-bind makes SQLite re-prepare
                // the statement each time.
                let all = devices::table
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .order((devices::updated_at, devices::id))
                    .select(Device::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)?;
                drop(conn);
                Ok(self.live(all).await.pop())
            }

            async fn register_device(
                &self,
                device: NewDevice,
                max_devices: usize,
            ) -> Result<Registration, StoreError> {
                let max_devices = max_devices.max(1);
                let mut conn = checkout(&self.reach, &self.write).await?;
                conn.$transaction(async |conn| {
                    $lock_account(conn, device.sip_user_id).await?;
                    let now = now_millis();
                    // Updated longest ago first: the order devices are
                    // displaced in.
                    let rows = devices::table
                        .filter(devices::sip_user_id.eq(device.sip_user_id))
                        .order((devices::updated_at, devices::id))
                        .select(Device::as_select())
                        .load(conn)
                        .await?;
                    let is_same = |d: &Device| {
                        let d = &d.registration;
                        d.app_id == device.app_id
                            && d.platform.same_phone(&d.token, device.platform, &device.token)
                    };
                    // A device whose SIP registration lapsed holds no place:
                    // it goes quietly (it is not told of a takeover) before
                    // any live device is displaced, unless it is the one
                    // registering again, which is refreshed. So does a
                    // second row of that one (an APNs token stored in both
                    // cases before tokens were normalised): one phone, one row.
                    let first_same = rows.iter().find(|d| is_same(d)).map(|d| d.id);
                    let (expired, mut existing): (Vec<Device>, Vec<Device>) =
                        rows.into_iter().partition(|d| {
                            if is_same(d) {
                                Some(d.id) != first_same
                            } else {
                                d.registration.expired(now)
                            }
                        });
                    if !expired.is_empty() {
                        let ids: Vec<i64> = expired.iter().map(|d| d.id).collect();
                        diesel::delete(devices::table.filter(devices::id.eq_any(ids)))
                            .execute(conn)
                            .await?;
                    }
                    let same = existing.iter().position(is_same);
                    // One device per account: whichever it has is replaced.
                    let replaced = same.or_else(|| {
                        (max_devices == 1)
                            .then(|| existing.len().checked_sub(1))
                            .flatten()
                    });
                    // Every field of the registration, on insert and on
                    // update alike (`NewDevice` is both); `created_at` only
                    // on insert.
                    let previous = match replaced {
                        Some(index) => {
                            let previous = existing.remove(index);
                            let device = if same.is_some() {
                                device.clone().merged_over(&previous.registration)
                            } else {
                                device.clone()
                            };
                            diesel::update(devices::table.find(previous.id))
                                .set((
                                    &device,
                                    devices::updated_at.eq(now),
                                    devices::last_seen_at.eq(now),
                                ))
                                .execute(conn)
                                .await?;
                            Some(previous)
                        }
                        None => {
                            diesel::insert_into(devices::table)
                                .values((
                                    &device,
                                    devices::created_at.eq(now),
                                    devices::updated_at.eq(now),
                                    devices::last_seen_at.eq(now),
                                ))
                                .execute(conn)
                                .await?;
                            None
                        }
                    };
                    // Beyond the limit (a new device, or a limit lowered
                    // since the account filled up), the oldest others go.
                    let excess = (existing.len() + 1).saturating_sub(max_devices);
                    let mut displaced: Vec<Device> = existing.drain(..excess).collect();
                    if !displaced.is_empty() {
                        let ids: Vec<i64> = displaced.iter().map(|d| d.id).collect();
                        diesel::delete(devices::table.filter(devices::id.eq_any(ids)))
                            .execute(conn)
                            .await?;
                    }
                    Ok(match previous {
                        None => Registration::Created { displaced },
                        Some(previous) => {
                            if !device
                                .platform
                                .same_token(&previous.registration.token, &device.token)
                            {
                                displaced.push(previous.clone());
                            }
                            Registration::Updated {
                                previous: Box::new(previous),
                                displaced,
                            }
                        }
                    })
                })
                .await
                .map_err(query_error)
            }

            async fn delete_device(
                &self,
                sip_user_id: i64,
                platform: Platform,
                token: &str,
                app_id: &str,
                by: Remover,
            ) -> Result<Removal, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let mut matching = devices::table
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .filter(devices::platform.eq_any(platform.one_service().iter().map(|p| p.as_str())))
                    .filter(devices::app_id.eq(app_id))
                    .select((devices::id, devices::token))
                    .into_boxed();
                // Either case of an APNs token (rows stored before tokens
                // were normalised keep theirs): the account's few rows are
                // found by the index first, so `lower()` costs nothing.
                matching = if platform.is_apns() {
                    matching.filter(lower(devices::token).eq(token.to_ascii_lowercase()))
                } else {
                    matching.filter(devices::token.eq(token))
                };
                let found: Vec<(i64, String)> =
                    matching.load(&mut conn).await.map_err(query_error)?;
                let mut removal = Removal::Missing;
                for (id, stored) in &found {
                    // The row as found, token and all: one a registration
                    // rewrote meanwhile (another phone's token on a
                    // one-device account) is not this device any more.
                    let row = || {
                        devices::table
                            .filter(devices::id.eq(id))
                            .filter(devices::token.eq(stored))
                    };
                    let app_owned = devices::expires_at.is_null();
                    // A proxy unbinds a device its app registered, and
                    // deletes one it registered itself; each statement
                    // checks who owns the row as it writes, and the first
                    // again if the app took the row over in between.
                    let unbind = || {
                        diesel::update(row().filter(app_owned))
                            .set(devices::proxy_expires_at.eq(None::<i64>))
                    };
                    if by == Remover::Proxy
                        && unbind().execute(&mut conn).await.map_err(query_error)? > 0
                    {
                        removal = Removal::Unbound;
                        continue;
                    }
                    let deleted = match by {
                        Remover::App => diesel::delete(row()).execute(&mut conn).await,
                        Remover::Proxy => {
                            diesel::delete(row().filter(devices::expires_at.is_not_null()))
                                .execute(&mut conn)
                                .await
                        }
                    }
                    .map_err(query_error)?;
                    if deleted > 0 {
                        removal = Removal::Deleted;
                    } else if by == Remover::Proxy
                        && unbind().execute(&mut conn).await.map_err(query_error)? > 0
                    {
                        removal = Removal::Unbound;
                    }
                }
                Ok(removal)
            }

            async fn forget_token(
                &self,
                sip_user_id: i64,
                token: &str,
            ) -> Result<bool, StoreError> {
                let removed = self.remove_devices(sip_user_id, Some(token)).await?;
                Ok(!removed.is_empty())
            }

            async fn devices(&self, sip_user_id: i64) -> Result<Vec<Device>, StoreError> {
                let all = self.listed(sip_user_id).await?;
                Ok(self.live(all).await)
            }

            async fn listed(&self, sip_user_id: i64) -> Result<Vec<Device>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                devices::table
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .order((devices::created_at, devices::id))
                    .select(Device::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)
            }

            async fn remove_devices(
                &self,
                sip_user_id: i64,
                token: Option<&str>,
            ) -> Result<Vec<Device>, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let mut delete = diesel::delete(devices::table)
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .into_boxed();
                if let Some(token) = token {
                    delete = delete.filter(devices::token.eq(token));
                }
                delete
                    .returning(Device::as_returning())
                    .get_results(&mut conn)
                    .await
                    .map_err(query_error)
            }

            async fn app(
                &self,
                platform: Platform,
                app_id: &str,
            ) -> Result<Option<App>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                apps::table
                    .filter(apps::platform.eq(platform.as_str()))
                    .filter(apps::app_id.eq(app_id))
                    .select(AppRow::as_select())
                    .first(&mut conn)
                    .await
                    .optional()
                    .map_err(query_error)?
                    .map(AppRow::into_app)
                    .transpose()
            }

            async fn apps(&self) -> Result<Vec<App>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                apps::table
                    .order((apps::platform, apps::app_id))
                    .select(AppRow::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)?
                    .into_iter()
                    .map(AppRow::into_app)
                    .collect()
            }

            async fn put_app(&self, app: &App) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let credentials = credentials_json(app);
                let updated = diesel::update(
                    apps::table
                        .filter(apps::platform.eq(app.platform.as_str()))
                        .filter(apps::app_id.eq(&app.app_id)),
                )
                .set(apps::credentials.eq(&credentials))
                .execute(&mut conn)
                .await
                .map_err(query_error)?;
                if updated > 0 {
                    return Ok(false);
                }
                diesel::insert_into(apps::table)
                    .values((
                        apps::platform.eq(app.platform.as_str()),
                        apps::app_id.eq(&app.app_id),
                        apps::credentials.eq(&credentials),
                        apps::created_at.eq(now_millis()),
                    ))
                    .execute(&mut conn)
                    .await
                    .map_err(query_error)?;
                Ok(true)
            }

            async fn remove_app(
                &self,
                platform: Platform,
                app_id: &str,
            ) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let deleted = diesel::delete(
                    apps::table
                        .filter(apps::platform.eq(platform.as_str()))
                        .filter(apps::app_id.eq(app_id)),
                )
                .execute(&mut conn)
                .await
                .map_err(query_error)?;
                Ok(deleted > 0)
            }

            async fn touch_device(&self, sip_user_id: i64) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let touched =
                    diesel::update(devices::table.filter(devices::sip_user_id.eq(sip_user_id)))
                        .set(devices::last_seen_at.eq(now_millis()))
                        .execute(&mut conn)
                        .await
                        .map_err(query_error)?;
                Ok(touched > 0)
            }

            async fn record_hangup(&self, hangup: HangupReason) -> Result<(), StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                diesel::insert_into(hangup_reasons::table)
                    .values((
                        hangup_reasons::sip_user_id.eq(hangup.sip_user_id),
                        hangup_reasons::unique_key.eq(&hangup.unique_key),
                        hangup_reasons::reason.eq(&hangup.reason),
                        hangup_reasons::created_at.eq(hangup.created_at),
                    ))
                    .execute(&mut conn)
                    .await
                    .map_err(query_error)?;
                Ok(())
            }

            async fn log_responses(&self, entries: &[ResponseLogEntry]) -> Result<(), StoreError> {
                let rows: Vec<_> = entries
                    .iter()
                    .map(|entry| {
                        (
                            response_log::platform.eq(entry.platform.as_str()),
                            response_log::roundtrip.eq(entry.roundtrip),
                            response_log::available.eq(entry.available),
                            response_log::created_at.eq(entry.created_at),
                        )
                    })
                    .collect();
                let mut conn = checkout(&self.reach, &self.write).await?;
                $append!(conn, response_log::table, rows).map_err(query_error)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                conn.batch_execute("SELECT 1").await.map_err(query_error)
            }

            async fn log_calls(&self, calls: &[CallHistoryEntry]) -> Result<(), StoreError> {
                let rows: Vec<_> = calls
                    .iter()
                    .map(|call| {
                        (
                            call_history::created_at.eq(call.created_at),
                            call_history::sip_user_id.eq(call.sip_user_id),
                            call_history::unique_key.eq(call.unique_key.clone()),
                            call_history::devices.eq(devices_json(&call.devices)),
                            call_history::outcome.eq(call.outcome.clone()),
                            call_history::waited_ms.eq(call.waited_ms),
                            call_history::answered_by.eq(call.answered_by),
                            call_history::roundtrip_ms.eq(call.roundtrip_ms),
                        )
                    })
                    .collect();
                let mut conn = checkout(&self.reach, &self.write).await?;
                $append!(conn, call_history::table, rows).map_err(query_error)
            }

            async fn calls(
                &self,
                sip_user_id: i64,
                since: Option<i64>,
                last: i64,
            ) -> Result<Vec<CallHistoryEntry>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                let mut query = call_history::table
                    .filter(call_history::sip_user_id.eq(sip_user_id))
                    .into_boxed();
                if let Some(since) = since {
                    query = query.filter(call_history::created_at.ge(since));
                }
                query
                    .order((call_history::created_at.desc(), call_history::id.desc()))
                    .limit(last)
                    .select(CallRow::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)?
                    .into_iter()
                    .map(CallRow::into_entry)
                    .collect()
            }

            async fn purge_calls(&self, before: i64) -> Result<usize, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                diesel::delete(call_history::table.filter(call_history::created_at.lt(before)))
                    .execute(&mut conn)
                    .await
                    .map_err(query_error)
            }

            async fn purge_reports(&self, before: i64) -> Result<usize, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let responses =
                    diesel::delete(response_log::table.filter(response_log::created_at.lt(before)))
                        .execute(&mut conn)
                        .await
                        .map_err(query_error)?;
                let hangups = diesel::delete(
                    hangup_reasons::table.filter(hangup_reasons::created_at.lt(before)),
                )
                .execute(&mut conn)
                .await
                .map_err(query_error)?;
                Ok(responses + hangups)
            }
        }
    };
}

/// PostgreSQL: a transaction-scoped advisory lock on the account, so
/// registrations of one account take turns and those of others do not wait
/// (a row lock cannot serve: the account may have no row yet).
async fn lock_account_pg(conn: &mut AsyncPgConnection, sip_user_id: i64) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(sip_user_id)
        .execute(conn)
        .await
        .map(drop)
}

/// SQLite: nothing more to take. The registration's `BEGIN IMMEDIATE` holds
/// the database's write lock from the start, so no other writer (another
/// process included) comes between its read and its writes, and it cannot
/// fail halfway upgrading a read lock.
async fn lock_account_sqlite(_conn: &mut SqliteConn, _sip_user_id: i64) -> QueryResult<()> {
    Ok(())
}

/// PostgreSQL: a batch of rows (the response log's, the call history's) in
/// one multi-row `INSERT`: one round trip, atomic by itself.
macro_rules! append_pg {
    ($conn:expr, $table:expr, $rows:expr) => {
        diesel::insert_into($table)
            .values($rows)
            .execute(&mut $conn)
            .await
            .map(drop)
    };
}

/// SQLite: a batch of rows in one transaction, a single-row `INSERT` per
/// row, run by diesel's synchronous SQLite connection on the connection's
/// blocking thread: one hop to that thread per batch (through the async
/// wrapper, each row's statement was a hop of its own, which cost a quarter
/// of the embedded set-up throughput). Not one multi-row `INSERT`: its
/// text differs with the batch's size, so diesel never caches it and SQLite
/// parsed it anew for every batch; the single-row `INSERT` stays prepared
/// (`docs/performance.md`, the set-ups lost since 5ac25e6).
macro_rules! append_sqlite {
    ($conn:expr, $table:expr, $rows:expr) => {{
        let rows = $rows;
        $conn
            .spawn_blocking(move |conn| {
                diesel::Connection::transaction(conn, |conn| {
                    for row in &rows {
                        diesel::RunQueryDsl::execute(
                            diesel::insert_into($table).values(row),
                            conn,
                        )?;
                    }
                    Ok::<_, diesel::result::Error>(())
                })
            })
            .await
            .map(drop)
    }};
}

diesel_store!(
    PgStore,
    AsyncPgConnection,
    transaction,
    lock_account_pg,
    append_pg
);
diesel_store!(
    SqliteStore,
    SqliteConn,
    immediate_transaction,
    lock_account_sqlite,
    append_sqlite
);
