//! Retention on PostgreSQL ([`RetentionBackend`] for [`Postgres`]): catalog checks,
//! the expiry predicate in SQL, batched deletes per table of a hierarchy, partition
//! removal.
//!
//! Every literal spliced into these statements is one we formatted ourselves (the
//! cutoff, bounds, limits) or a quoted literal/identifier; `where` is the operator's
//! own SQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use super::reading::{Cutoff, Reading};
use super::{
    with_where, Batch, BatchArchive, BatchDone, RetentionBackend, RetentionError, RowKey, Scan,
    Target,
};
use crate::config::{RetentionConfig, ScanMode};
use crate::db::{quote, quote_literal, set_timeout, Postgres, QualifiedName, Scope, Timeout};

impl RetentionBackend for Postgres {
    async fn resolve(
        &self,
        table: &QualifiedName,
        cfg: &RetentionConfig,
    ) -> Result<Target, RetentionError> {
        let q = |e| RetentionError::Db(self.query_error(e));
        let column = cfg.column.as_str();
        // One connection for the whole look-up: every new connection costs a round trip
        // or two, and over TCP sqlx's can stall on Nagle's algorithm.
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| RetentionError::Db(self.connect_error(e)))?;
        let row = sqlx::query(
            "SELECT c.oid::int8, c.relkind::text, n.nspname::text, c.relname::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
        )
        .bind(table.quoted())
        .fetch_optional(&mut *conn)
        .await
        .map_err(q)?
        .ok_or_else(|| RetentionError::NoTable {
            database: self.name.clone(),
            table: table.to_string(),
        })?;
        let oid: i64 = row.get(0);
        let relkind: String = row.get(1);
        let qualified = QualifiedName {
            schema: Some(row.get(2)),
            name: row.get(3),
        };
        // Domains count as their base type.
        let typ: Option<(String, String)> = sqlx::query_as(
            "SELECT CASE WHEN t.typtype = 'd' THEN bt.typname::text ELSE t.typname::text END,
                    format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
             WHERE a.attrelid = $1::int8::oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(oid)
        .bind(column)
        .fetch_optional(&mut *conn)
        .await
        .map_err(q)?;
        let (typname, display) = typ.ok_or_else(|| RetentionError::NoColumn {
            table: table.to_string(),
            column: column.to_owned(),
        })?;
        let unit = cfg.epoch_unit;
        let reading = match typname.as_str() {
            "timestamptz" => Reading::Instant,
            "timestamp" => Reading::WallClock {
                zone: zone(self, &mut conn, cfg).await?,
            },
            "date" => Reading::Date {
                zone: zone(self, &mut conn, cfg).await?,
            },
            "int2" | "int4" | "int8" => Reading::Epoch {
                unit,
                integer: true,
            },
            "numeric" | "float4" | "float8" => Reading::Epoch {
                unit,
                integer: false,
            },
            _ => {
                return Err(RetentionError::ColumnType {
                    table: table.to_string(),
                    column: column.to_owned(),
                    kind: display,
                })
            }
        };
        // The table and every inheritance child or partition below it.
        let tree: Vec<(i64, String, String)> = sqlx::query_as(
            "WITH RECURSIVE tree(oid) AS (
                 SELECT $1::int8::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
             SELECT c.oid::int8, format('%I.%I', n.nspname, c.relname), c.relkind::text
             FROM tree JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace
             ORDER BY c.oid",
        )
        .bind(oid)
        .fetch_all(&mut *conn)
        .await
        .map_err(q)?;
        if let Some((_, name, _)) = tree.iter().find(|(_, _, kind)| kind == "f") {
            return Err(RetentionError::ForeignTable {
                table: table.to_string(),
                child: name.clone(),
            });
        }
        if !cfg.cascade {
            let oids: Vec<i64> = tree.iter().map(|(o, _, _)| *o).collect();
            let referencing: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT format('%s (%s)', conrelid::regclass, conname)
                 FROM pg_constraint
                 WHERE contype = 'f' AND confrelid = ANY($1::int8[]::oid[])
                   AND confdeltype IN ('c', 'n', 'd') AND NOT (conrelid = ANY($1::int8[]::oid[]))
                 ORDER BY 1",
            )
            .bind(&oids)
            .fetch_all(&mut *conn)
            .await
            .map_err(q)?;
            RetentionError::refuse_cascades(table, referencing)?;
        }
        Ok(Target {
            table: table.to_string(),
            alias: quote(&table.name),
            table_sql: qualified.quoted(),
            column_sql: quote(column),
            reading,
            relations: tree
                .into_iter()
                .filter(|(_, _, kind)| kind == "r")
                .map(|(_, name, _)| name)
                .collect(),
            row_key: RowKey::Ctid,
            oid: u32::try_from(oid).ok(),
            partitioned: relkind == "p",
            where_clause: cfg.where_clause.clone(),
        })
    }

    /// `c < cutoff` in the column's own semantics; true only for readable values. The
    /// wall-clock forms first bound the column itself (two days of slack for any zone's
    /// offset change), so an index on it still narrows the scan, then compare the instant.
    fn expired(&self, target: &Target, cutoff: Cutoff) -> String {
        let c = &target.column_sql;
        let cut = format!("{}::timestamptz", cutoff.iso_literal());
        match &target.reading {
            Reading::Instant => format!("isfinite({c}) AND {c} < {cut}"),
            // The session's TimeZone is the column's zone (see `transaction`), so casts
            // between timestamp and timestamptz read wall clocks exactly as the
            // application's sessions do, whatever form the zone setting takes.
            Reading::WallClock { .. } => format!(
                "isfinite({c}) AND {c} < {cut}::timestamp + interval '2 days' \
                 AND {c}::timestamptz < {cut}"
            ),
            Reading::Date { .. } => {
                format!("isfinite({c}) AND {c} < {cut}::date + 2 AND {c}::timestamptz < {cut}")
            }
            Reading::Epoch { unit, integer } => {
                let (min, _) = Reading::integer_range(*unit);
                let bound = if *integer {
                    cutoff.integer_bound(*unit).to_string()
                } else {
                    cutoff.exact(*unit)
                };
                format!("{c} >= {min} AND {c} < {bound}")
            }
            Reading::SqliteValue { .. } => "false".to_owned(),
        }
    }

    /// Non-null values that are not a time: infinities, numbers outside years 1–9999
    /// (NaN included: PostgreSQL sorts it above every number).
    fn unreadable(&self, target: &Target) -> String {
        let c = &target.column_sql;
        match &target.reading {
            Reading::Instant | Reading::WallClock { .. } | Reading::Date { .. } => {
                format!("{c} IN ('infinity', '-infinity')")
            }
            Reading::Epoch { unit, .. } => {
                let (min, max) = Reading::integer_range(*unit);
                // Past the last whole unit of year 9999 (NaN sorts above every number).
                format!("({c} < {min} OR {c} >= {})", i128::from(max) + 1)
            }
            Reading::SqliteValue { .. } => "false".to_owned(),
        }
    }

    /// Plans each table of the hierarchy.
    async fn validate(&self, target: &Target, condition: &str) -> Result<(), RetentionError> {
        let mut tx = transaction(self, target, None, false).await?;
        for relation in &target.relations {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "EXPLAIN SELECT 1 FROM ONLY {relation} AS {} WHERE {condition}",
                target.alias
            )))
            .execute(&mut *tx)
            .await
            .map_err(|e| RetentionError::Where(self.query_error(e)))?;
        }
        Ok(())
    }

    async fn clock(&self) -> Result<Option<DateTime<Utc>>, RetentionError> {
        // The transaction's start time, as the rows' `DEFAULT now()` would be.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| RetentionError::Db(self.query_error(e)))?;
        Ok(Some(now))
    }

    async fn count(&self, target: &Target, condition: &str) -> Result<u64, RetentionError> {
        let sql = format!(
            "SELECT count(*) FROM {} AS {} WHERE {condition}",
            target.table_sql, target.alias,
        );
        let mut tx = transaction(self, target, None, false).await?;
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| RetentionError::Db(self.query_error(e)))?;
        Ok(n.max(0) as u64)
    }

    /// With `from` (after a run that went through every table), only rows from about
    /// the cutoff on are looked at: just after a mass delete, the index on the column
    /// starts with thousands of dead entries that a search from the beginning would have to
    /// step over one by one. Rows a writer held during that run are the next run's.
    async fn oldest(
        &self,
        target: &Target,
        from: Option<Cutoff>,
    ) -> Result<Option<DateTime<Utc>>, RetentionError> {
        let (mut readable, seconds) = oldest_parts(target);
        if let Some(cutoff) = from {
            readable.push_str(&format!(" AND {}", not_before(target, cutoff)));
        }
        let sql = format!(
            "SELECT {seconds} FROM {} AS {} WHERE {} ORDER BY {} LIMIT 1",
            target.table_sql,
            target.alias,
            with_where(&readable, target.where_clause.as_deref()),
            target.column_sql
        );
        let mut tx = transaction(self, target, None, false).await?;
        let secs: Option<f64> = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| RetentionError::Db(self.query_error(e)))?;
        Ok(secs.and_then(|s| DateTime::from_timestamp_millis((s * 1000.0) as i64)))
    }

    /// How to walk one table: by page ranges when a large share of it is expired (or it
    /// is small), else by picking rows. The share is the planner's estimate.
    async fn scan_for(
        &self,
        target: &Target,
        relation: &str,
        condition: &str,
        mode: ScanMode,
    ) -> Result<Scan, RetentionError> {
        let db_err = |e| RetentionError::Db(self.query_error(e));
        if mode == ScanMode::Rows {
            return Ok(Scan::Rows { after: None });
        }
        // `relation` is quoted by format('%I.%I'); here it is the text of a regclass.
        let (pages, tuples): (i64, f32) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT (pg_relation_size({r}::regclass) / current_setting('block_size')::int8)::int8, c.reltuples
             FROM pg_class c WHERE c.oid = {r}::regclass",
            r = quote_literal(relation)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        if pages == 0 {
            return Ok(Scan::Rows { after: None });
        }
        let mut tx = transaction(self, target, None, false).await?;
        let plan: serde_json::Value = sqlx::query_scalar(AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM ONLY {relation} AS {} WHERE {condition}",
            target.alias
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        let estimate = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
        let tuples = f64::from(tuples.max(0.0));
        // Never analyzed: no estimate, and reading it once is the safe guess.
        let share = if tuples > 0.0 { estimate / tuples } else { 1.0 };
        if pages > 0 && (mode == ScanMode::Pages || share >= PAGE_SCAN_SHARE) {
            let rows_per_page = if tuples > 0.0 {
                tuples / pages as f64
            } else {
                100.0
            };
            Ok(Scan::Pages {
                next: 0,
                end: pages,
                rows_per_page,
            })
        } else {
            Ok(Scan::Rows { after: None })
        }
    }

    /// One table at a time (ONLY: never its children). Page ranges delete straight from a TID range scan, waiting for rows a writer has
    /// locked; if that wait hits the lock timeout, the same range is done again skipping
    /// the locked rows (left for the next run). Row picking always skips locked rows.
    async fn delete_batch(
        &self,
        target: &Target,
        batch: &Batch<'_>,
    ) -> Result<BatchDone, RetentionError> {
        let r = batch.relation;
        let a = &target.alias;
        let condition = batch.condition;
        let n = batch.limit;
        let skip_locked = |range: &str, limit: &str| {
            format!(
                "DELETE FROM ONLY {r} AS {a} \
                 WHERE ctid = ANY(ARRAY(SELECT ctid FROM ONLY {r} AS {a} WHERE {range}{condition}{limit} FOR UPDATE SKIP LOCKED)) \
                 AND {condition}"
            )
        };
        match batch.scan {
            // An array of tids makes the outer delete a TID scan.
            Scan::Rows { .. } => {
                run_batch(
                    self,
                    target,
                    batch,
                    &skip_locked("", &format!(" LIMIT {n}")),
                    batch.archive,
                )
                .await
            }
            Scan::Pages { next, .. } => {
                let range = format!(
                    "ctid >= '({next},0)'::tid AND ctid < '({},0)'::tid AND ",
                    next + i64::from(n)
                );
                let direct = format!("DELETE FROM ONLY {r} AS {a} WHERE {range}{condition}");
                match run_batch(self, target, batch, &direct, batch.archive).await {
                    Err(RetentionError::Db(e)) if e.sqlstate().as_deref() == Some("55P03") => {
                        tracing::info!(database = %self.name, table = r, "rows locked by another transaction; skipping them in this page range");
                        run_batch(self, target, batch, &skip_locked(&range, ""), batch.archive)
                            .await
                    }
                    other => other,
                }
            }
        }
    }

    /// Partition modes need a table partitioned by RANGE on the retention column alone.
    async fn check_partition_key(&self, target: &Target) -> Result<(), RetentionError> {
        if !target.partitioned {
            return Err(RetentionError::NotPartitioned {
                table: target.table.clone(),
            });
        }
        let oid = i64::from(target.oid.unwrap_or_default());
        let keydef: String = sqlx::query_scalar("SELECT pg_get_partkeydef($1::int8::oid)")
            .bind(oid)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| RetentionError::Db(self.query_error(e)))?;
        let column = target.column_sql.trim_matches('"').replace("\"\"", "\"");
        let plain = format!("RANGE ({column})");
        let quoted = format!("RANGE ({})", target.column_sql);
        if keydef != plain && keydef != quoted {
            return Err(RetentionError::PartitionKey {
                table: target.table.clone(),
                keydef,
            });
        }
        Ok(())
    }

    /// Range partitions of a table partitioned on the retention column whose upper bound,
    /// read like the column's values, is at or before the cutoff and that hold no
    /// unreadable value, oldest first.
    async fn expired_partitions(
        &self,
        target: &Target,
        cutoff: Cutoff,
    ) -> Result<Vec<String>, RetentionError> {
        let db_err = |e| RetentionError::Db(self.query_error(e));
        self.check_partition_key(target).await?;
        let oid = i64::from(target.oid.unwrap_or_default());
        let rows = sqlx::query(
            "SELECT format('%I.%I', n.nspname, c.relname), pg_get_expr(c.relpartbound, c.oid)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE i.inhparent = $1::int8::oid",
        )
        .bind(oid)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let cut = format!("{}::timestamptz", cutoff.iso_literal());
        let mut tx = transaction(self, target, None, false).await?;
        let mut expired = Vec::new();
        for row in rows {
            let name: String = row.get(0);
            let bound: String = row.get(1);
            // "FOR VALUES FROM ('…') TO ('…')": the server compares the upper bound, so
            // its own parsing of the literal decides (MAXVALUE never expires).
            let Some(upper) = bound
                .split(" TO (")
                .nth(1)
                .and_then(|s| s.strip_suffix(')'))
            else {
                continue;
            };
            if upper.contains("MAXVALUE") {
                continue;
            }
            // `upper` is the server's own rendering of a partition bound literal.
            let is_old = match &target.reading {
                Reading::Instant => format!("({upper})::timestamptz <= {cut}"),
                Reading::WallClock { .. } => format!("({upper})::timestamp::timestamptz <= {cut}"),
                Reading::Date { .. } => format!("({upper})::date::timestamptz <= {cut}"),
                Reading::Epoch { unit, .. } => {
                    format!("({upper})::numeric <= {}::numeric", cutoff.exact(*unit))
                }
                Reading::SqliteValue { .. } => "false".to_owned(),
            };
            // The bound is only a quick test: a partition goes only if every row in it is
            // expired by the rule itself (a DST-gap wall clock reads later than the bound;
            // -infinity is not a time).
            let sql = format!(
                "SELECT ({is_old}) AND NOT EXISTS (SELECT 1 FROM {name} WHERE {})",
                not_expired(self, target, cutoff)
            );
            let old: bool = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
            if old {
                expired.push(name);
            }
        }
        expired.sort();
        Ok(expired)
    }

    /// Drops (or detaches) every expired partition, each in its own transaction (which
    /// first counts its rows, for the metrics). Returns the partitions and the row total.
    async fn remove_partitions(
        &self,
        target: &Target,
        cutoff: Cutoff,
        detach: bool,
        lock_timeout: Duration,
    ) -> Result<(Vec<String>, u64), RetentionError> {
        let mut gone = Vec::new();
        let mut rows = 0u64;
        for partition in self.expired_partitions(target, cutoff).await? {
            // `partition` comes from format('%I.%I'), so it is already quoted.
            let statement = if detach {
                format!(
                    "ALTER TABLE {} DETACH PARTITION {partition}",
                    target.table_sql
                )
            } else {
                format!("DROP TABLE {partition}")
            };
            let mut tx = transaction(self, target, Some(lock_timeout), false).await?;
            let db_err = |e| RetentionError::Db(self.query_error(e));
            // Locked first, then re-checked: nothing can slip in between check and drop.
            sqlx::raw_sql(AssertSqlSafe(format!(
                "LOCK TABLE {partition} IN ACCESS EXCLUSIVE MODE"
            )))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            let (count, kept): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT count(*), count(*) FILTER (WHERE {}) FROM {partition}",
                not_expired(self, target, cutoff)
            )))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            if kept > 0 {
                tracing::warn!(database = %self.name, partition, rows = kept, "kept a partition past the cutoff: it holds rows the rule does not find expired");
                continue;
            }
            sqlx::raw_sql(AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(|e| RetentionError::Db(self.query_error(e)))?;
            rows += count.max(0) as u64;
            tx.commit()
                .await
                .map_err(|e| RetentionError::Db(self.query_error(e)))?;
            tracing::info!(database = %self.name, partition, detach, "removed an expired partition");
            gone.push(partition);
        }
        Ok((gone, rows))
    }
}

/// The zone `timestamp`/`date` values are written in: `column-timezone`, or the
/// database's own default, which is what the application's sessions get. sqlx sets
/// TimeZone=UTC in every session it opens, so the default is read from the
/// configuration itself, in PostgreSQL's order: role-in-database, role, database,
/// server configuration file.
async fn zone(
    pg: &Postgres,
    conn: &mut sqlx::PgConnection,
    cfg: &RetentionConfig,
) -> Result<String, RetentionError> {
    let q = |e| RetentionError::Db(pg.query_error(e));
    if let Some(zone) = &cfg.column_timezone {
        // PostgreSQL's zone database must know it too.
        sqlx::query("SELECT now() AT TIME ZONE $1")
            .bind(zone)
            .execute(&mut *conn)
            .await
            .map_err(|source| RetentionError::UnknownZone {
                zone: zone.clone(),
                source,
            })?;
        return Ok(zone.clone());
    }
    let per_role_or_db: Option<String> = sqlx::query_scalar(
        "SELECT substr(s, strpos(s, '=') + 1)
         FROM pg_db_role_setting r, unnest(r.setconfig) s
         WHERE lower(split_part(s, '=', 1)) = 'timezone'
           AND r.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
           AND r.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = session_user))
           AND NOT (r.setdatabase = 0 AND r.setrole = 0)
         ORDER BY (r.setrole <> 0) DESC, (r.setdatabase <> 0) DESC
         LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(q)?;
    if let Some(zone) = per_role_or_db {
        return Ok(zone);
    }
    let from_file: Result<Option<Option<String>>, sqlx::Error> = sqlx::query_scalar(
        "SELECT setting FROM pg_file_settings
         WHERE lower(name) = 'timezone' AND applied ORDER BY seqno DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await;
    match from_file {
        Ok(Some(Some(zone))) => Ok(zone),
        // Not in any file: the built-in default.
        Ok(_) => Ok("GMT".to_owned()),
        Err(source) => Err(RetentionError::DefaultZone {
            column: cfg.column.clone(),
            source,
        }),
    }
}

/// Rows the rule must keep: NULL, unreadable or not before the cutoff.
fn not_expired(pg: &Postgres, target: &Target, cutoff: Cutoff) -> String {
    format!(
        "{c} IS NULL OR NOT ({})",
        pg.expired(target, cutoff),
        c = target.column_sql
    )
}

/// The readable values' filter, and their unix seconds, for finding the oldest one
/// by the column's order (so an index on it answers at once).
fn oldest_parts(target: &Target) -> (String, String) {
    let c = &target.column_sql;
    match &target.reading {
        Reading::Instant => (
            format!("isfinite({c})"),
            format!("extract(epoch FROM {c})::float8"),
        ),
        Reading::WallClock { .. } | Reading::Date { .. } => (
            format!("isfinite({c})"),
            format!("extract(epoch FROM {c}::timestamptz)::float8"),
        ),
        Reading::Epoch { unit, .. } => {
            let (min, max) = Reading::integer_range(*unit);
            (
                format!("{c} >= {min} AND {c} < {}", i128::from(max) + 1),
                format!("{c}::float8 / {}", unit.per_second()),
            )
        }
        Reading::SqliteValue { .. } => ("false".to_owned(), "NULL::float8".to_owned()),
    }
}

/// A transaction on a pooled connection of its own, in the column's zone (for
/// `timestamp` and `date` columns), with a lock timeout if given. Dropped without
/// commit, it rolls back.
///
/// `lazy_commit` commits without waiting for the WAL flush (`synchronous_commit =
/// off`): a crash right after can only undo the last deletes, whose rows are then
/// deleted again by the next run; nothing that should stay can go. It saves a disk
/// flush per batch.
async fn transaction(
    pg: &Postgres,
    target: &Target,
    lock_timeout: Option<Duration>,
    lazy_commit: bool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, RetentionError> {
    let mut tx = pg
        .pool
        .begin()
        .await
        .map_err(|e| RetentionError::Db(pg.connect_error(e)))?;
    let mut settings = Vec::new();
    if let Reading::WallClock { zone } | Reading::Date { zone } = &target.reading {
        // Set like the database's own setting is, so `-7` means what it means there
        // (7 hours west), which `AT TIME ZONE '-7'` would not.
        settings.push(format!("SET LOCAL TimeZone = {}", quote_literal(zone)));
    }
    if let Some(t) = lock_timeout {
        settings.push(set_timeout(Scope::Transaction, Timeout::Lock, Some(t)));
    }
    if lazy_commit {
        settings.push("SET LOCAL synchronous_commit = off".to_owned());
    }
    if !settings.is_empty() {
        sqlx::raw_sql(AssertSqlSafe(settings.join("; ")))
            .execute(&mut *tx)
            .await
            .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
    }
    Ok(tx)
}

/// A bound on the column itself (so an index serves it) that every value not before
/// the cutoff meets, with the same two days of slack as [`expired`] for wall clocks.
fn not_before(target: &Target, cutoff: Cutoff) -> String {
    let c = &target.column_sql;
    let cut = format!("{}::timestamptz", cutoff.iso_literal());
    match &target.reading {
        Reading::Instant => format!("{c} >= {cut}"),
        Reading::WallClock { .. } => format!("{c} >= {cut}::timestamp - interval '2 days'"),
        Reading::Date { .. } => format!("{c} >= {cut}::date - 2"),
        Reading::Epoch { unit, integer } => {
            if *integer {
                format!("{c} >= {}", cutoff.integer_bound(*unit))
            } else {
                format!("{c} >= {}", cutoff.exact(*unit))
            }
        }
        Reading::SqliteValue { .. } => "true".to_owned(),
    }
}

/// Below this share of expired rows a batch picks its rows (through an index on the
/// column, if there is one); above it, reading the table once in page ranges is
/// cheaper, as the planner would choose for a plain DELETE.
const PAGE_SCAN_SHARE: f64 = 0.05;

/// Runs one batch's DELETE in its own transaction with the lock timeout.
async fn run_batch(
    pg: &Postgres,
    target: &Target,
    batch: &Batch<'_>,
    delete: &str,
    archive: Option<&BatchArchive<'_>>,
) -> Result<BatchDone, RetentionError> {
    let db_err = |e| RetentionError::Db(pg.query_error(e));
    let sql = match archive {
        Some(_) => format!("{delete} RETURNING row_to_json({})::text", target.alias),
        None => delete.to_owned(),
    };
    let mut tx = transaction(pg, target, Some(batch.lock_timeout), true).await?;
    let query = sqlx::query(AssertSqlSafe(sql));
    let rows = match archive {
        None => query
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected(),
        Some(archive) => {
            let rows: Vec<String> = query
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            if !rows.is_empty() {
                archive.write(&rows)?;
            }
            rows.len() as u64
        }
    };
    tx.commit().await.map_err(db_err)?;
    Ok(BatchDone {
        rows,
        last_id: None,
    })
}
