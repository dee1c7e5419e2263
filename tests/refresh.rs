//! SQLite refresh with the real binary: it replaces only tables it created, rebuilds
//! a table whose query's columns changed, and readers in another process never see
//! an empty or half-built table.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sqlite, Workdir};
use predicates::prelude::*;

/// A `[[database]]` named `lite` on `db` with one refresh job per `(view, name, query)`.
fn config(w: &Workdir, db: &Path, refreshes: &[(&str, &str, &str)]) {
    config_with(w, db, "", refreshes);
}

/// As [`config`], with `database_extra` (e.g. `foreign-keys = true`) in `[[database]]`.
fn config_with(w: &Workdir, db: &Path, database_extra: &str, refreshes: &[(&str, &str, &str)]) {
    let mut text = format!(
        "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n{database_extra}\n",
        db.display()
    );
    for (view, name, query) in refreshes {
        text.push_str(&format!(
            "[[database.refresh]]\nview = '{view}'\nname = \"{name}\"\nschedule = \"manual\"\n\
             retries = 3\nretry-backoff = \"30s\"\nquery = \"{query}\"\n"
        ));
    }
    w.write_config("", &text);
}

/// `app.db` in WAL mode with `rows` sales spread over 40 regions `r0` … `r39` (row `i`
/// is in region `r{i % 40}` with amount `i`).
fn sales_db(w: &Workdir, rows: u32) -> PathBuf {
    let db = w.path().join("app.db");
    sqlite(
        &db,
        &format!(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE sales (id INTEGER PRIMARY KEY, region TEXT, amount REAL);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
               INSERT INTO sales (region, amount) SELECT 'r' || (i % 40), i FROM n;"
        ),
    );
    db
}

fn schema_sql(db: &Path, name: &str) -> String {
    sqlite(
        db,
        &format!("SELECT sql FROM sqlite_schema WHERE name = '{name}'"),
    )
    .trim()
    .to_owned()
}

#[test]
fn an_application_table_or_view_is_never_replaced_and_check_says_what_to_do() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         INSERT INTO customers (name) VALUES ('ada'), ('grace'), ('edsger');
         CREATE VIEW recent AS SELECT name FROM customers;",
    );
    let before = sqlite(&db, "SELECT * FROM customers");
    let customers_sql = schema_sql(&db, "customers");
    let query = "SELECT 1 AS id, 'replaced' AS name";
    config(
        &w,
        &db,
        &[
            ("customers", "customers", query),
            // SQLite names are case-insensitive: the same table.
            ("Customers", "upper", query),
            ("recent", "recent", query),
        ],
    );
    w.cmd(&["check"]).assert().code(2).stderr(
        predicate::str::contains("job lite.refresh.customers")
            .and(predicate::str::contains(
                "table customers in database \"lite\" was not created by dbkeeper",
            ))
            .and(predicate::str::contains(
                "point `view` in [[database.refresh]] at another name",
            ))
            .and(predicate::str::contains("drop the table"))
            .and(predicate::str::contains("job lite.refresh.upper"))
            .and(predicate::str::contains("view recent")),
    );
    for job in [
        "lite.refresh.customers",
        "lite.refresh.upper",
        "lite.refresh.recent",
    ] {
        let started = Instant::now();
        w.cmd(&["run-job", job])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("was not created by dbkeeper"));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{job}: a refusal is not retried"
        );
    }
    assert_eq!(
        sqlite(&db, "SELECT * FROM customers"),
        before,
        "rows untouched"
    );
    assert_eq!(
        schema_sql(&db, "customers"),
        customers_sql,
        "table untouched"
    );
    assert!(schema_sql(&db, "recent").starts_with("CREATE VIEW"));

    // Dropped by the operator, the table is dbkeeper's from now on.
    sqlite(&db, "DROP VIEW recent; DROP TABLE customers;");
    w.cmd(&["run-job", "lite.refresh.customers"])
        .assert()
        .success()
        .stdout(predicate::str::contains("created: 1 rows"));
    assert!(
        schema_sql(&db, "customers").contains("/* dbkeeper:refresh */"),
        "{}",
        schema_sql(&db, "customers")
    );
    w.cmd(&["run-job", "lite.refresh.upper"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rebuilt: 1 rows"));
    assert_eq!(
        sqlite(&db, "SELECT id, name FROM customers").trim(),
        "1|replaced"
    );
}

/// A refresh table another table references with a foreign key is refused, whatever
/// its `ON DELETE` action and whether or not foreign keys are enforced: deleting its
/// rows would delete (cascade) or orphan the application's rows.
#[test]
fn a_refresh_table_referenced_by_a_foreign_key_is_refused_and_nothing_is_touched() {
    for foreign_keys in ["", "foreign-keys = true"] {
        for second in [
            "SELECT region, sum(amount) AS total FROM sales GROUP BY region",
            "SELECT region, sum(amount) AS total, count(*) AS n FROM sales GROUP BY region",
        ] {
            let w = Workdir::new();
            let db = sales_db(&w, 80);
            let first = "SELECT region, sum(amount) AS total FROM sales GROUP BY region";
            config_with(&w, &db, foreign_keys, &[("totals", "totals", first)]);
            w.cmd(&["run-job", "lite.refresh.totals"])
                .assert()
                .success();
            sqlite(
                &db,
                "CREATE UNIQUE INDEX totals_region ON totals (region);
                 CREATE TABLE notes (id INTEGER PRIMARY KEY,
                                     region TEXT REFERENCES totals (region) ON DELETE CASCADE);
                 CREATE TABLE pins (region TEXT REFERENCES Totals (region));
                 INSERT INTO notes (region) VALUES ('r1'), ('r2');",
            );
            let before = sqlite(&db, "SELECT * FROM totals ORDER BY region");
            config_with(&w, &db, foreign_keys, &[("totals", "totals", second)]);
            w.cmd(&["check"]).assert().code(2).stderr(
                predicate::str::contains("job lite.refresh.totals")
                    .and(predicate::str::contains(
                        "table totals in database \"lite\" is referenced by a foreign key from notes, pins",
                    )),
            );
            let started = Instant::now();
            w.cmd(&["run-job", "lite.refresh.totals"])
                .assert()
                .code(1)
                .stderr(predicate::str::contains("referenced by a foreign key"));
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "a refusal is not retried"
            );
            assert_eq!(sqlite(&db, "SELECT count(*) FROM notes").trim(), "2");
            assert_eq!(sqlite(&db, "SELECT * FROM totals ORDER BY region"), before);
        }
    }
    // Referenced before dbkeeper ever created it: refused as well.
    let w = Workdir::new();
    let db = sales_db(&w, 10);
    sqlite(
        &db,
        "CREATE TABLE early (t TEXT REFERENCES totals (region))",
    );
    config(&w, &db, &[("totals", "totals", "SELECT region FROM sales")]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("foreign key from early"));
    assert_eq!(schema_sql(&db, "totals"), "");
}

#[test]
fn changed_query_columns_rebuild_the_table_and_values_land_under_their_names() {
    let w = Workdir::new();
    let db = sales_db(&w, 80);
    let view = "we\"ird totals";
    let quoted = "\"we\"\"ird totals\"";
    let first =
        "SELECT region, sum(amount) AS total, avg(amount) AS mean FROM sales GROUP BY region";
    config(&w, &db, &[(view, "totals", first)]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains("created: 40 rows"));
    sqlite(
        &db,
        &format!(
            "CREATE INDEX totals_region ON {quoted} (region);
             CREATE INDEX totals_mean ON {quoted} (mean);"
        ),
    );

    // Other columns, in another order: the table is built anew.
    let second =
        "SELECT sum(amount) AS total, count(*) AS n, region FROM sales GROUP BY region ORDER BY region";
    config(&w, &db, &[(view, "totals", second)]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "rebuilt with new columns: 40 rows",
        ))
        .stderr(predicate::str::contains(
            "index totals_mean no longer applies",
        ));
    assert_eq!(
        sqlite(
            &db,
            &format!(
                "SELECT group_concat(name, ',') FROM pragma_table_info('{}')",
                view.replace('\'', "''")
            )
        )
        .trim(),
        "total,n,region"
    );
    assert_eq!(
        sqlite(
            &db,
            &format!("SELECT region, total, n FROM {quoted} WHERE region IN ('r0', 'r1')")
        )
        .trim(),
        "r0|120.0|2\nr1|42.0|2",
        "each value under its own name"
    );
    let indexes = |db: &Path| {
        sqlite(
            db,
            "SELECT group_concat(name, ',') FROM sqlite_schema WHERE type = 'index'",
        )
        .trim()
        .to_owned()
    };
    assert_eq!(
        indexes(&db),
        "totals_region",
        "the index that still applies is kept"
    );
    assert!(schema_sql(&db, view).contains("/* dbkeeper:refresh */"));

    // Same columns again: rows replaced in place, the index stays.
    sqlite(&db, "INSERT INTO sales (region, amount) VALUES ('east', 1)");
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rebuilt: 41 rows"));
    assert_eq!(indexes(&db), "totals_region");
    w.cmd(&["check"]).assert().success();
}

#[test]
fn readers_in_another_process_never_see_an_empty_or_half_built_table_when_columns_change() {
    let w = Workdir::new();
    let db = sales_db(&w, 100_000);
    sqlite(
        &db,
        "CREATE VIEW big_regions AS SELECT region FROM \"region totals\" WHERE n > 0",
    );
    let queries = [
        "SELECT region, sum(amount) AS total, count(*) AS n FROM sales GROUP BY region",
        "SELECT count(*) AS n, region FROM sales GROUP BY region",
    ];
    config(&w, &db, &[("region totals", "totals", queries[0])]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains("40 rows"));
    sqlite(
        &db,
        "CREATE INDEX region_totals_region ON \"region totals\" (region)",
    );

    // The reader is the sqlite3 shell: a process of its own, one snapshot per
    // statement (the rows, the columns, and a view over the table).
    let stop = Arc::new(AtomicBool::new(false));
    let (path, stop_reader) = (db.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        let mut reads = 0u64;
        while !stop_reader.load(Ordering::Relaxed) {
            let seen = sqlite(
                &path,
                "SELECT (SELECT count(*) FROM \"region totals\"),
                        (SELECT count(*) FROM pragma_table_info('region totals')),
                        (SELECT count(*) FROM big_regions)",
            );
            assert!(
                matches!(seen.trim(), "40|2|40" | "40|3|40"),
                "a reader saw rows|columns|rows through the view = {seen}"
            );
            reads += 1;
        }
        reads
    });
    for i in 1..=6 {
        config(&w, &db, &[("region totals", "totals", queries[i % 2])]);
        w.cmd(&["run-job", "lite.refresh.totals"])
            .assert()
            .success()
            .stdout(predicate::str::contains(
                "rebuilt with new columns: 40 rows",
            ));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader");
    assert!(reads > 10, "{reads} reads");
    assert_eq!(
        sqlite(
            &db,
            "SELECT count(*) FROM sqlite_schema WHERE name = 'region_totals_region'"
        )
        .trim(),
        "1",
        "the index is re-created on every rebuild"
    );
}

/// A query that reads the refresh table itself sees its old rows on both paths (same
/// columns: rows replaced in place; new columns: table rebuilt).
#[test]
fn a_query_reading_its_own_table_sees_the_old_rows_on_both_paths() {
    let w = Workdir::new();
    let db = sales_db(&w, 4);
    config(&w, &db, &[("snap", "snap", "SELECT id, amount FROM sales")]);
    w.cmd(&["run-job", "lite.refresh.snap"]).assert().success();
    // Carry the previous snapshot forward (same columns and types: rows replaced in
    // place), with what is new in sales.
    sqlite(&db, "INSERT INTO sales (region, amount) VALUES ('east', 5)");
    let same = "SELECT id, amount FROM snap UNION ALL SELECT id, amount FROM sales WHERE id > (SELECT max(id) FROM snap)";
    config(&w, &db, &[("snap", "snap", same)]);
    w.cmd(&["run-job", "lite.refresh.snap"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rebuilt: 5 rows"));
    assert_eq!(
        sqlite(
            &db,
            "SELECT group_concat(amount, ',') FROM (SELECT amount FROM snap ORDER BY id)"
        )
        .trim(),
        "1.0,2.0,3.0,4.0,5.0"
    );
    let changed = "SELECT id, amount, amount + 1 AS next FROM snap";
    config(&w, &db, &[("snap", "snap", changed)]);
    w.cmd(&["run-job", "lite.refresh.snap"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rebuilt with new columns: 5 rows"));
    assert_eq!(
        sqlite(
            &db,
            "SELECT group_concat(next, ',') FROM (SELECT next FROM snap ORDER BY id)"
        )
        .trim(),
        "2.0,3.0,4.0,5.0,6.0"
    );
}

/// SQLite's TEMP schema is refused when the configuration is loaded: a TEMP table
/// vanishes when dbkeeper's connection closes.
#[test]
fn a_refresh_into_the_temp_schema_is_a_config_error() {
    let w = Workdir::new();
    let db = sales_db(&w, 4);
    for view in ["temp.snap", "TEMP.snap"] {
        config(&w, &db, &[(view, "snap", "SELECT id FROM sales")]);
        w.cmd(&["check"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains("TEMP schema"));
        w.cmd(&["run-job", "lite.refresh.snap"]).assert().code(2);
    }
}

/// When the query's columns change, triggers are not created again (SQLite would accept
/// one using a dropped column and every later refresh would fail); each is named in the
/// run summary. An index that cannot be created for another reason than a missing
/// column (a UNIQUE index the new rows violate) fails the rebuild, which rolls back.
#[test]
fn a_rebuild_drops_triggers_by_name_and_a_violated_unique_index_rolls_it_back() {
    let w = Workdir::new();
    let db = sales_db(&w, 80);
    let first = "SELECT region, count(*) AS n FROM sales GROUP BY region";
    config(&w, &db, &[("totals", "totals", first)]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success();
    sqlite(
        &db,
        "CREATE TABLE seen (n INT);
         CREATE TRIGGER totals_seen AFTER INSERT ON totals BEGIN INSERT INTO seen VALUES (NEW.n); END;
         CREATE INDEX totals_n ON totals (n);
         CREATE UNIQUE INDEX totals_region ON totals (region);",
    );
    let second = "SELECT region, sum(amount) AS m FROM sales GROUP BY region";
    config(&w, &db, &[("totals", "totals", second)]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "dropped with the old columns: index totals_n, trigger totals_seen",
        ))
        .stderr(predicate::str::contains("trigger totals_seen"));
    assert_eq!(schema_sql(&db, "totals_seen"), "", "not created again");
    assert!(schema_sql(&db, "totals_region").contains("UNIQUE"));
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rebuilt: 40 rows"));

    // Two rows per region now: the UNIQUE index cannot come back.
    let third = "SELECT region, amount AS a, id FROM sales";
    config(&w, &db, &[("totals", "totals", third)]);
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("index totals_region").and(predicate::str::contains(
                "rolled back and the old table is intact",
            )),
        );
    assert_eq!(
        sqlite(
            &db,
            "SELECT group_concat(name, ',') FROM pragma_table_info('totals')"
        )
        .trim(),
        "region,m"
    );
    assert_eq!(sqlite(&db, "SELECT count(*) FROM totals").trim(), "40");
}
