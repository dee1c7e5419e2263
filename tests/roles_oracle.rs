//! Differential test of `restore --with-roles` (`Postgres::create_missing_globals`)
//! against an oracle written here from the README's rule, on the real server:
//! "creates missing roles and memberships; it never alters or drops an existing role",
//! memberships granted only where the member or the group was just created, a
//! membership into a role missing on the server listed as not granted, all in one
//! transaction.
//!
//! Each case makes a "backup" by creating 2–6 roles with generated attributes,
//! passwords (SCRAM or md5 form), awkward role-wide settings and memberships (among
//! them, into `pg_read_all_data`, into a role that never exists), reads them back
//! from the catalogs itself, drops them, pre-creates a random subset with different
//! attributes and memberships, runs the call and compares every catalog row of every
//! generated name with what the rule says. A second property runs the call as a
//! `CREATEROLE` (not superuser) role with one step PostgreSQL refuses it and checks
//! that nothing at all changed. Cases per property: $DBKEEPER_ORACLE_CASES (default 32).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};

use dbkeeper::db::{Created, Database, Globals, GlobalsError, Membership, Role};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence, TestRunner};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

fn cases() -> u32 {
    std::env::var("DBKEEPER_ORACLE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

fn runner() -> TestRunner {
    TestRunner::new(PropConfig {
        cases: cases(),
        // `run` on a hand-made runner knows no source file: the path is given whole
        // (relative to the package, where cargo runs tests).
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/roles_oracle.txt",
        ))),
        ..PropConfig::default()
    })
}

/// A built-in role every PostgreSQL ≥ 14 has (memberships in built-in roles are carried).
const BUILTIN: &str = "pg_read_all_data";

const WORK_MEM: &[&str] = &["64MB", "1GB", "4096kB", "100"];
/// `search_path` items: quoting, commas, a `$`, case, spaces at either end and the
/// empty string (`SET search_path = ''`, the usual hardening) all change how the
/// server stores the list.
const PATH_ITEMS: &[&str] = &[
    "app",
    "$user",
    "public",
    "a,b",
    "it's",
    "x\"y",
    "Mixed Case",
    "",
    " lead",
    "trail ",
];
/// Values of a custom (placeholder) setting: any text.
const CUSTOM: &[&str] = &["plain", "it's, \"odd\"", "a=b, c", "back\\slash", "ünï", ""];
const VALID_UNTIL: &[&str] = &[
    "2031-05-17 12:34:56+00",
    "infinity",
    "2099-12-31 23:59:59.5+00",
];
const CONN_LIMIT: &[i32] = &[-1, 0, 3, 100];

#[derive(Debug, Clone)]
enum Setting {
    WorkMem(usize),
    SearchPath(Vec<usize>),
    Custom(usize),
}

#[derive(Debug, Clone)]
enum Password {
    None,
    /// A cleartext password the server turns into a SCRAM hash.
    Scram(u32),
    /// An md5-form hash, stored as given.
    Md5(u128),
}

#[derive(Debug, Clone)]
struct Attrs {
    superuser: bool,
    replication: bool,
    bypassrls: bool,
    login: bool,
    inherit: bool,
    createdb: bool,
    createrole: bool,
    conn_limit: usize,
    valid_until: Option<usize>,
    settings: Vec<Setting>,
    password: Password,
    /// A per-database setting (`IN DATABASE postgres`), only for pre-existing roles.
    db_setting: Option<usize>,
}

fn setting() -> impl Strategy<Value = Setting> {
    prop_oneof![
        (0..WORK_MEM.len()).prop_map(Setting::WorkMem),
        prop::collection::vec(0..PATH_ITEMS.len(), 1..4).prop_map(Setting::SearchPath),
        (0..CUSTOM.len()).prop_map(Setting::Custom),
    ]
}

/// `elevated`: whether SUPERUSER/REPLICATION/BYPASSRLS may be on (only a superuser
/// restorer can create those).
fn attrs(elevated: bool) -> impl Strategy<Value = Attrs> {
    let flag = move |p: f64| {
        if elevated {
            prop::bool::weighted(p).boxed()
        } else {
            Just(false).boxed()
        }
    };
    (
        (flag(0.1), flag(0.2), flag(0.2)),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        0..CONN_LIMIT.len(),
        prop::option::of(0..VALID_UNTIL.len()),
        prop::collection::vec(setting(), 0..3),
        prop_oneof![
            Just(Password::None),
            any::<u32>().prop_map(Password::Scram),
            any::<u128>().prop_map(Password::Md5),
        ],
        prop::option::weighted(0.3, 0..WORK_MEM.len()),
    )
        .prop_map(
            |(
                (superuser, replication, bypassrls),
                (login, inherit, createdb, createrole),
                conn_limit,
                valid_until,
                settings,
                password,
                db_setting,
            )| Attrs {
                superuser,
                replication,
                bypassrls,
                login,
                inherit,
                createdb,
                createrole,
                conn_limit,
                valid_until,
                settings,
                password,
                db_setting,
            },
        )
}

/// A membership `group → member` by index; normalised so that the group's index is
/// lower, which keeps every generated graph (backup and pre-existing together) acyclic.
type Edge = (usize, usize, bool);

#[derive(Debug, Clone)]
struct Case {
    /// Each role's attributes in the backup, and on the server before the restore
    /// (`None`: missing there).
    roles: Vec<(Attrs, Option<Attrs>)>,
    memberships: Vec<Edge>,
    /// Members of [`BUILTIN`] in the backup, with admin option.
    builtin: Vec<(usize, bool)>,
    /// A member of a role that is on no server.
    gone: Option<(usize, bool)>,
    /// Memberships on the server before, kept to pre-existing roles at run time.
    pre_memberships: Vec<Edge>,
    pre_builtin: Vec<(usize, bool)>,
    /// Failure property: which role is made impossible, and how.
    bad: usize,
    bad_kind: usize,
    /// Failure property: where in the membership list the impossible grant goes.
    bad_at: usize,
}

fn edges(n: usize) -> impl Strategy<Value = Vec<Edge>> {
    prop::collection::vec((0..n, 0..n, any::<bool>()), 0..8).prop_map(|raw| {
        let mut seen = BTreeSet::new();
        raw.into_iter()
            .filter(|(a, b, _)| a != b)
            .map(|(a, b, admin)| (a.min(b), a.max(b), admin))
            .filter(|(g, m, _)| seen.insert((*g, *m)))
            .collect()
    })
}

fn members(n: usize) -> impl Strategy<Value = Vec<(usize, bool)>> {
    prop::collection::vec((0..n, any::<bool>()), 0..3).prop_map(|raw| {
        let mut seen = BTreeSet::new();
        raw.into_iter().filter(|(m, _)| seen.insert(*m)).collect()
    })
}

fn case(elevated: bool) -> impl Strategy<Value = Case> {
    (2usize..=6).prop_flat_map(move |n| {
        (
            prop::collection::vec(
                (
                    attrs(elevated),
                    prop::option::weighted(0.4, attrs(elevated)),
                ),
                n,
            ),
            edges(n),
            members(n),
            prop::option::weighted(0.3, (0..n, any::<bool>())),
            edges(n),
            members(n),
            (0..n, 0usize..4, 0usize..10),
        )
            .prop_map(
                |(roles, memberships, builtin, gone, pre_memberships, pre_builtin, bad)| Case {
                    roles,
                    memberships,
                    builtin,
                    gone,
                    pre_memberships,
                    pre_builtin,
                    bad: bad.0,
                    bad_kind: bad.1,
                    bad_at: bad.2,
                },
            )
    })
}

/// Identifiers and literals quoted here, not with dbkeeper's helpers.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The SQL that makes role `name` have `a` (as a superuser).
/// `tag` keeps the backup's and the target's cleartext passwords apart; per-database
/// settings only on the target (a backup does not carry them).
fn create_sql(name: &str, a: &Attrs, tag: &str) -> String {
    let f = |on: bool, w: &str| if on { w.to_owned() } else { format!("NO{w}") };
    let mut sql = format!(
        "CREATE ROLE {} {} {} {} {} {} {} {} CONNECTION LIMIT {}",
        ident(name),
        f(a.superuser, "SUPERUSER"),
        f(a.replication, "REPLICATION"),
        f(a.bypassrls, "BYPASSRLS"),
        f(a.login, "LOGIN"),
        f(a.inherit, "INHERIT"),
        f(a.createdb, "CREATEDB"),
        f(a.createrole, "CREATEROLE"),
        CONN_LIMIT[a.conn_limit]
    );
    if let Some(v) = a.valid_until {
        sql.push_str(&format!(" VALID UNTIL {}", literal(VALID_UNTIL[v])));
    }
    match a.password {
        Password::None => {}
        Password::Scram(k) => sql.push_str(&format!(" PASSWORD 'pw-{tag}-{k}'")),
        Password::Md5(h) => sql.push_str(&format!(" PASSWORD 'md5{h:032x}'")),
    }
    sql.push_str(";\n");
    for s in &a.settings {
        let set = match s {
            Setting::WorkMem(i) => format!("work_mem = {}", literal(WORK_MEM[*i])),
            Setting::SearchPath(items) => format!(
                "search_path = {}",
                items
                    .iter()
                    .map(|i| literal(PATH_ITEMS[*i]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Setting::Custom(i) => format!("dbk_x.opt = {}", literal(CUSTOM[*i])),
        };
        sql.push_str(&format!("ALTER ROLE {} SET {set};\n", ident(name)));
    }
    if let (Some(i), "t") = (a.db_setting, tag) {
        sql.push_str(&format!(
            "ALTER ROLE {} IN DATABASE postgres SET work_mem = {};\n",
            ident(name),
            literal(WORK_MEM[i])
        ));
    }
    sql
}

fn grant_sql(group: &str, member: &str, admin: bool) -> String {
    format!(
        "GRANT {} TO {}{};\n",
        ident(group),
        ident(member),
        if admin { " WITH ADMIN OPTION" } else { "" }
    )
}

/// Everything the catalogs say about one role.
#[derive(Debug, Clone, PartialEq)]
struct RoleState {
    /// Same oid before and after: the role was not dropped and recreated.
    oid: i64,
    attrs: (bool, bool, bool, bool, bool, bool, bool, i32),
    valid_until: Option<String>,
    password: Option<String>,
    /// Role-wide settings as stored (order kept: that is how `Role` carries them).
    settings: Vec<String>,
    /// Per-database settings: (database oid, settings).
    db_settings: Vec<(i64, Vec<String>)>,
}

impl RoleState {
    /// Compared without the oid (a created role's is new) and with settings as a set.
    fn content(&self) -> impl PartialEq + std::fmt::Debug {
        let mut settings = self.settings.clone();
        settings.sort();
        (
            self.attrs,
            self.valid_until.clone(),
            self.password.clone(),
            settings,
            self.db_settings.clone(),
        )
    }
}

type Memberships = BTreeSet<(String, String, bool)>;

/// The state of every role in `names` that exists, and every membership in which one
/// of them is the group or the member.
async fn read_state(
    conn: &mut PgConnection,
    names: &[String],
) -> (BTreeMap<String, RoleState>, Memberships) {
    type Row = (
        i64,
        String,
        bool,
        bool,
        bool,
        bool,
        bool,
        bool,
        bool,
        i32,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT oid::int8, rolname::text, rolsuper, rolinherit, rolcreaterole, rolcreatedb,
                rolcanlogin, rolreplication, rolbypassrls, rolconnlimit,
                rolvaliduntil::text, rolpassword
           FROM pg_authid WHERE rolname = ANY($1)",
    )
    .bind(names)
    .fetch_all(&mut *conn)
    .await
    .expect("pg_authid");
    let mut roles = BTreeMap::new();
    for r in rows {
        let settings: Vec<(i64, Vec<String>)> = sqlx::query_as(
            "SELECT setdatabase::int8, setconfig::text[] FROM pg_db_role_setting
              WHERE setrole = $1::int8::oid ORDER BY 1",
        )
        .bind(r.0)
        .fetch_all(&mut *conn)
        .await
        .expect("pg_db_role_setting");
        let (global, per_db): (Vec<_>, Vec<_>) = settings.into_iter().partition(|s| s.0 == 0);
        roles.insert(
            r.1,
            RoleState {
                oid: r.0,
                attrs: (r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9),
                valid_until: r.10,
                password: r.11,
                settings: global.into_iter().flat_map(|s| s.1).collect(),
                db_settings: per_db,
            },
        );
    }
    let members: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT g.rolname::text, m.rolname::text, am.admin_option FROM pg_auth_members am
           JOIN pg_authid g ON g.oid = am.roleid JOIN pg_authid m ON m.oid = am.member
          WHERE g.rolname = ANY($1) OR m.rolname = ANY($1)",
    )
    .bind(names)
    .fetch_all(&mut *conn)
    .await
    .expect("pg_auth_members");
    (roles, members.into_iter().collect())
}

/// Drops every role a case may have made, however the case ends.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let list: Vec<String> = self.0.iter().map(|n| ident(n)).collect();
        let _ = std::process::Command::new("psql")
            .arg(format!("{}/postgres", common::pg_server()))
            .args(["-qAtc", &format!("DROP ROLE IF EXISTS {}", list.join(", "))])
            .output();
    }
}

async fn superuser() -> PgConnection {
    let mut conn = PgConnection::connect(&format!("{}/postgres", common::pg_server()))
        .await
        .expect("connect");
    // Valid-until read back as the generator wrote it.
    sqlx::raw_sql("SET TimeZone = 'UTC'")
        .execute(&mut conn)
        .await
        .expect("zone");
    conn
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    if !sql.is_empty() {
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// A case's role names: unique per process and case (roles are cluster-wide), with a
/// space, both quotes and upper case.
fn names(n: usize, seq: u32) -> (Vec<String>, String) {
    let pid = std::process::id();
    let roles = (0..n)
        .map(|i| format!("dbk or {pid}.{seq}\"R{i}'"))
        .collect();
    (roles, format!("dbk or {pid}.{seq} Gone"))
}

/// The backup: the roles created with the backup's attributes, read back from the
/// catalogs as a backup of that server would carry them, then dropped.
async fn make_backup(
    conn: &mut PgConnection,
    case: &Case,
    names: &[String],
    gone: &str,
) -> (Globals, BTreeMap<String, RoleState>) {
    let mut sql = String::new();
    for (i, (a, _)) in case.roles.iter().enumerate() {
        sql.push_str(&create_sql(&names[i], a, "b"));
    }
    for &(g, m, admin) in &case.memberships {
        sql.push_str(&grant_sql(&names[g], &names[m], admin));
    }
    for &(m, admin) in &case.builtin {
        sql.push_str(&grant_sql(BUILTIN, &names[m], admin));
    }
    exec(conn, &sql).await;
    let (state, members) = read_state(conn, names).await;
    let roles = names
        .iter()
        .map(|name| {
            let s = &state[name];
            let (superuser, inherit, createrole, createdb, login, replication, bypassrls, limit) =
                s.attrs;
            Role {
                name: name.clone(),
                superuser,
                inherit,
                createrole,
                createdb,
                login,
                replication,
                bypassrls,
                connection_limit: limit,
                valid_until: s.valid_until.clone(),
                password: s.password.clone(),
                settings: s.settings.clone(),
            }
        })
        .collect();
    let mut memberships: Vec<Membership> = members
        .into_iter()
        .map(|(role, member, admin_option)| Membership {
            role,
            member,
            admin_option,
        })
        .collect();
    if let Some((m, admin_option)) = case.gone {
        memberships.push(Membership {
            role: gone.to_owned(),
            member: names[m].clone(),
            admin_option,
        });
    }
    let list: Vec<String> = names.iter().map(|n| ident(n)).collect();
    exec(conn, &format!("DROP ROLE {}", list.join(", "))).await;
    let globals = Globals {
        database_owner: None,
        roles,
        memberships,
        tablespaces: Vec::new(),
    };
    (globals, state)
}

/// The target server before the restore: the pre-existing subset with its own
/// attributes, passwords, settings and memberships.
async fn make_target(conn: &mut PgConnection, case: &Case, names: &[String]) {
    let pre = |i: usize| case.roles[i].1.is_some();
    let mut sql = String::new();
    for (i, (_, before)) in case.roles.iter().enumerate() {
        if let Some(a) = before {
            sql.push_str(&create_sql(&names[i], a, "t"));
        }
    }
    for &(g, m, admin) in &case.pre_memberships {
        if pre(g) && pre(m) {
            sql.push_str(&grant_sql(&names[g], &names[m], admin));
        }
    }
    for &(m, admin) in &case.pre_builtin {
        if pre(m) {
            sql.push_str(&grant_sql(BUILTIN, &names[m], admin));
        }
    }
    exec(conn, &sql).await;
}

async fn restore_as(url: &str, globals: &Globals) -> Result<Created, GlobalsError> {
    let cfg = dbkeeper::repo::restore::target_config(url);
    let Database::Postgres(pg) = Database::open(&cfg).expect("open") else {
        panic!("not PostgreSQL")
    };
    pg.create_missing_globals(globals).await
}

/// What the README's rule says a successful call leaves and reports.
struct Expected {
    roles: BTreeMap<String, RoleState>,
    memberships: Memberships,
    created: Vec<String>,
    existing: Vec<String>,
    granted: Vec<String>,
    /// (`role → member`, the reason's key words).
    not_granted: Vec<(String, &'static str)>,
}

fn oracle(
    globals: &Globals,
    backup: &BTreeMap<String, RoleState>,
    before: &BTreeMap<String, RoleState>,
    before_members: &Memberships,
) -> Expected {
    // Roles: an existing one exactly as it was; a missing one exactly as backed up.
    let mut roles = before.clone();
    let mut created = Vec::new();
    let mut existing = Vec::new();
    for r in &globals.roles {
        if before.contains_key(&r.name) {
            existing.push(r.name.clone());
        } else {
            created.push(r.name.clone());
            roles.insert(r.name.clone(), backup[&r.name].clone());
        }
    }
    // Memberships: present after iff present before, or both roles exist after, one of
    // them was just created and the group is on the server; new ones with the
    // backup's admin option.
    let mut memberships = before_members.clone();
    let mut granted = Vec::new();
    let mut not_granted = Vec::new();
    let is_created = |n: &str| created.iter().any(|c| c == n);
    let exists_after = |n: &str| n == BUILTIN || roles.contains_key(n);
    for m in &globals.memberships {
        let label = format!("{} → {}", m.role, m.member);
        if before_members
            .iter()
            .any(|(g, mm, _)| *g == m.role && *mm == m.member)
        {
            continue;
        }
        if !exists_after(&m.role) {
            not_granted.push((label, "not on this server"));
        } else if !exists_after(&m.member) {
            // Never generated: every member is one of the case's roles.
            unreachable!("member {} missing", m.member);
        } else if is_created(&m.role) || is_created(&m.member) {
            memberships.insert((m.role.clone(), m.member.clone(), m.admin_option));
            granted.push(label);
        } else {
            not_granted.push((label, "both roles existed"));
        }
    }
    Expected {
        roles,
        memberships,
        created,
        existing,
        granted,
        not_granted,
    }
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

async fn run_case(seq: u32, case: &Case) -> Result<(), TestCaseError> {
    let (names, gone) = names(case.roles.len(), seq);
    let mut all = names.clone();
    all.push(gone.clone());
    let _cleanup = Cleanup(all.clone());
    let mut conn = superuser().await;
    let (globals, backup) = make_backup(&mut conn, case, &names, &gone).await;
    make_target(&mut conn, case, &names).await;
    let (before, before_members) = read_state(&mut conn, &all).await;
    let expected = oracle(&globals, &backup, &before, &before_members);

    let created = restore_as(&format!("{}/postgres", common::pg_server()), &globals)
        .await
        .map_err(|e| TestCaseError::fail(format!("create_missing_globals: {e}")))?;
    let (after, after_members) = read_state(&mut conn, &all).await;

    prop_assert_eq!(
        after.keys().collect::<Vec<_>>(),
        expected.roles.keys().collect::<Vec<_>>()
    );
    for (name, want) in &expected.roles {
        let got = &after[name];
        if before.contains_key(name) {
            // Untouched, down to the oid (never dropped and recreated).
            prop_assert_eq!(got, want, "existing role {} changed", name);
        } else {
            prop_assert_eq!(
                got.content(),
                want.content(),
                "created role {} differs from the backup",
                name
            );
        }
    }
    prop_assert_eq!(&after_members, &expected.memberships);
    prop_assert_eq!(sorted(&created.roles), sorted(&expected.created));
    prop_assert_eq!(sorted(&created.existing), sorted(&expected.existing));
    prop_assert_eq!(sorted(&created.memberships), sorted(&expected.granted));
    prop_assert_eq!(created.not_granted.len(), expected.not_granted.len());
    for (label, why) in &expected.not_granted {
        let prefix = format!("{label} (");
        prop_assert!(
            created
                .not_granted
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(why)),
            "{} ({}) not listed in {:?}",
            label,
            why,
            created.not_granted
        );
    }
    Ok(())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

#[test]
fn with_roles_matches_the_oracle() {
    let rt = common::runtime();
    runner()
        .run(&case(true), |case| {
            let seq = SEQ.fetch_add(1, Ordering::SeqCst);
            rt.block_on(run_case(seq, &case))
        })
        .expect("property");
}

/// One step a `CREATEROLE` restorer may not take: a missing role with SUPERUSER,
/// REPLICATION or BYPASSRLS (refused while creating roles), or a membership of a
/// created role in an existing superuser role (refused while granting, after roles
/// were created). Either way the call fails and nothing changed.
async fn run_failing_case(seq: u32, case: &Case) -> Result<(), TestCaseError> {
    let mut case = case.clone();
    let (names, gone) = names(case.roles.len(), seq);
    let pid = std::process::id();
    let restorer = format!("dbk_or_rst_{pid}_{seq}");
    let su = format!("dbk or {pid}.{seq} Su");
    let mut all = names.clone();
    all.extend([gone.clone(), restorer.clone(), su.clone()]);
    let _cleanup = Cleanup(all.clone());
    // Placeholder settings need SET privileges a CREATEROLE role may lack: they would
    // fail the call for a reason other than the one chosen here.
    for (backup, target) in &mut case.roles {
        for a in std::iter::once(backup).chain(target.as_mut()) {
            a.settings.retain(|s| !matches!(s, Setting::Custom(_)));
        }
    }
    // The bad role is missing, so that something needs creating.
    case.roles[case.bad].1 = None;
    let kind = case.bad_kind;
    match kind {
        0 => case.roles[case.bad].0.superuser = true,
        1 => case.roles[case.bad].0.replication = true,
        2 => case.roles[case.bad].0.bypassrls = true,
        _ => {}
    }
    let mut conn = superuser().await;
    let (mut globals, _) = make_backup(&mut conn, &case, &names, &gone).await;
    if kind == 3 {
        let at = case.bad_at.min(globals.memberships.len());
        globals.memberships.insert(
            at,
            Membership {
                role: su.clone(),
                member: names[case.bad].clone(),
                admin_option: false,
            },
        );
    }
    make_target(&mut conn, &case, &names).await;
    exec(
        &mut conn,
        &format!(
            "CREATE ROLE {} LOGIN CREATEROLE NOSUPERUSER; CREATE ROLE {} SUPERUSER NOLOGIN;",
            ident(&restorer),
            ident(&su)
        ),
    )
    .await;
    let before = read_state(&mut conn, &all).await;

    let url = common::pg_server().replacen(
        "postgres://postgres@",
        &format!("postgres://{restorer}@"),
        1,
    );
    let result = restore_as(&format!("{url}/postgres"), &globals).await;
    let after = read_state(&mut conn, &all).await;

    match result {
        Err(GlobalsError::Statement { .. }) => {}
        other => prop_assert!(false, "expected PostgreSQL's refusal, got {:?}", other),
    }
    prop_assert_eq!(&after.0, &before.0, "roles changed");
    prop_assert_eq!(&after.1, &before.1, "memberships changed");
    Ok(())
}

#[test]
fn with_roles_changes_nothing_when_one_step_is_refused() {
    let rt = common::runtime();
    runner()
        .run(&case(false), |case| {
            let seq = SEQ.fetch_add(1, Ordering::SeqCst);
            rt.block_on(run_failing_case(seq, &case))
        })
        .expect("property");
}
