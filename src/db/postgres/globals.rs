//! Cluster globals a PostgreSQL database needs: the roles its objects depend on, with
//! their attributes, role-wide settings and memberships, and the tablespaces its
//! objects live in. Collected at backup time ([`Postgres::collect_globals`]) and, on
//! `restore --with-roles`, recreated where missing ([`Postgres::create_missing_globals`]).
//!
//! Read from the catalogs, not from `pg_dumpall --globals-only`: the roles a database
//! needs are exactly what `pg_shdepend` records for its objects (owners, ACL grantees,
//! policy roles, default ACLs — what `DROP ROLE` itself consults), plus the database
//! owner, closed over memberships. pg_dumpall's SQL would have to be parsed back to
//! keep only those, and it `ALTER`s roles that exist, which a restore must never do.
//! Structured data lets the restore create only what is missing, with every name
//! quoted by us.
//!
//! Password hashes are collected only when the connecting role may read `pg_authid`
//! (superusers); they travel only inside the encrypted archive and are never logged:
//! [`Role`]'s `Debug` leaves them out.

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection};

use super::Postgres;
use crate::db::{quote, quote_literal, DbError};

/// The roles, memberships and tablespaces a database needs (format version 1 of the
/// archive's globals section, see `docs/FORMAT.md`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Globals {
    /// The owner of the database that was backed up (if not a built-in role).
    pub database_owner: Option<String>,
    pub roles: Vec<Role>,
    pub memberships: Vec<Membership>,
    pub tablespaces: Vec<Tablespace>,
}

/// A role and its attributes, as `CREATE ROLE` takes them.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    pub superuser: bool,
    pub inherit: bool,
    pub createrole: bool,
    pub createdb: bool,
    pub login: bool,
    pub replication: bool,
    pub bypassrls: bool,
    /// -1: no limit.
    pub connection_limit: i32,
    /// `VALID UNTIL`, as the server printed it.
    pub valid_until: Option<String>,
    /// The stored hash (SCRAM or md5), when the backup could read `pg_authid`.
    pub password: Option<String>,
    /// Role-wide settings (`ALTER ROLE … SET`), as `name=value`.
    pub settings: Vec<String>,
}

// Never the password hash: errors and logs may print a role.
impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Role")
            .field("name", &self.name)
            .field("login", &self.login)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish_non_exhaustive()
    }
}

/// `GRANT role TO member [WITH ADMIN OPTION]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    pub role: String,
    pub member: String,
    pub admin_option: bool,
}

/// A tablespace the database's objects use (never `pg_default`/`pg_global`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tablespace {
    pub name: String,
    /// Its directory on the server it was backed up from.
    pub location: String,
}

/// Counts for the manifest and `backup list`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GlobalsSummary {
    pub roles: u32,
    pub memberships: u32,
    pub tablespaces: u32,
    /// Whether password hashes were readable and stored.
    pub passwords: bool,
}

impl Globals {
    pub fn summary(&self) -> GlobalsSummary {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        GlobalsSummary {
            roles: count(self.roles.len()),
            memberships: count(self.memberships.len()),
            tablespaces: count(self.tablespaces.len()),
            passwords: self.roles.iter().any(|r| r.password.is_some()),
        }
    }
}

/// What `restore --with-roles` did (names only, never a password).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Created {
    pub roles: Vec<String>,
    /// `role → member`.
    pub memberships: Vec<String>,
    /// Roles that existed already and were left exactly as they were.
    pub existing: Vec<String>,
    /// `role → member (why)` not granted: the role is not on this server (a
    /// built-in role of another PostgreSQL version), or both roles existed before.
    pub not_granted: Vec<String>,
}

/// The globals could not be read or recreated.
#[derive(Debug, thiserror::Error)]
pub enum GlobalsError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the role restoring (\"{0}\") has neither SUPERUSER nor CREATEROLE, which --with-roles needs to create the missing roles {1}; restore as a role that has it, or create them by hand")]
    NoCreateRole(String, String),
    #[error("tablespace(s) the backup uses are missing on the target server: {0}; dbkeeper does not create tablespaces (they need an empty directory on the server): create them with CREATE TABLESPACE first; nothing was changed")]
    MissingTablespaces(String),
    #[error("cannot {what}: {source}; no role was created")]
    Statement {
        what: String,
        #[source]
        source: sqlx::Error,
    },
}

/// The roles the current database needs: the database owner and every role
/// `pg_shdepend` records for an object in it (owner, ACL, policy, default ACL) or
/// for the database itself, then every role those are members of, recursively.
const NEEDED: &str = "WITH RECURSIVE db AS (
       SELECT oid, datdba FROM pg_database WHERE datname = current_database()
   ), needed(oid) AS (
       SELECT datdba FROM db
       UNION
       SELECT d.refobjid FROM pg_shdepend d, db
        WHERE d.refclassid = 'pg_authid'::regclass
          AND (d.dbid = db.oid
               OR (d.dbid = 0 AND d.classid = 'pg_database'::regclass AND d.objid = db.oid))
       UNION
       SELECT m.roleid FROM pg_auth_members m JOIN needed n ON m.member = n.oid
   )";

/// Roles below this oid are built in (the bootstrap superuser, `pg_*`): present in
/// every cluster, never created; memberships in them are still carried.
const FIRST_NORMAL_OID: &str = "16384";

/// GUCs whose value is a list (`GUC_LIST_QUOTE`): stored as `a, "b c"`, each item
/// given to `SET` as its own literal.
const LIST_SETTINGS: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "local_preload_libraries",
    "session_preload_libraries",
    "shared_preload_libraries",
];

impl Postgres {
    /// Reads the globals the configured database needs.
    pub async fn collect_globals(&self) -> Result<Globals, DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        let q = |e| self.query_error(e);
        type RoleRow = (
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
        );
        let rows: Vec<RoleRow> = sqlx::query_as(AssertSqlSafe(format!(
            "{NEEDED} SELECT r.rolname::text, r.rolsuper, r.rolinherit, r.rolcreaterole,
                    r.rolcreatedb, r.rolcanlogin, r.rolreplication, r.rolbypassrls,
                    r.rolconnlimit, r.rolvaliduntil::text
               FROM pg_roles r WHERE r.oid IN (SELECT oid FROM needed)
                AND r.oid >= {FIRST_NORMAL_OID} ORDER BY r.rolname"
        )))
        .fetch_all(&mut *conn)
        .await
        .map_err(q)?;
        let mut roles: Vec<Role> = rows
            .into_iter()
            .map(|r| Role {
                name: r.0,
                superuser: r.1,
                inherit: r.2,
                createrole: r.3,
                createdb: r.4,
                login: r.5,
                replication: r.6,
                bypassrls: r.7,
                connection_limit: r.8,
                valid_until: r.9,
                password: None,
                settings: Vec::new(),
            })
            .collect();
        // Only a role that may read pg_authid (a superuser) sees the hashes; others
        // back up the roles without passwords rather than failing.
        let readable: bool =
            sqlx::query_scalar("SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')")
                .fetch_one(&mut *conn)
                .await
                .map_err(q)?;
        if readable {
            let hashes: Vec<(String, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
                "{NEEDED} SELECT rolname::text, rolpassword FROM pg_authid
                  WHERE oid IN (SELECT oid FROM needed)"
            )))
            .fetch_all(&mut *conn)
            .await
            .map_err(q)?;
            for (name, hash) in hashes {
                if let Some(role) = roles.iter_mut().find(|r| r.name == name) {
                    role.password = hash;
                }
            }
        }
        let settings: Vec<(String, Vec<String>)> = sqlx::query_as(AssertSqlSafe(format!(
            "{NEEDED} SELECT r.rolname::text, s.setconfig::text[]
               FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
              WHERE s.setdatabase = 0 AND s.setrole IN (SELECT oid FROM needed)"
        )))
        .fetch_all(&mut *conn)
        .await
        .map_err(q)?;
        for (name, config) in settings {
            if let Some(role) = roles.iter_mut().find(|r| r.name == name) {
                role.settings = config;
            }
        }
        let memberships: Vec<(String, String, bool)> = sqlx::query_as(AssertSqlSafe(format!(
            "{NEEDED} SELECT g.rolname::text, m.rolname::text, bool_or(am.admin_option)
               FROM pg_auth_members am
               JOIN pg_roles g ON g.oid = am.roleid
               JOIN pg_roles m ON m.oid = am.member
              WHERE am.member IN (SELECT oid FROM needed) AND am.member >= {FIRST_NORMAL_OID}
              GROUP BY 1, 2 ORDER BY 1, 2"
        )))
        .fetch_all(&mut *conn)
        .await
        .map_err(q)?;
        let tablespaces: Vec<(String, String)> = sqlx::query_as(
            "SELECT t.spcname::text, pg_tablespace_location(t.oid)
               FROM pg_tablespace t
              WHERE t.spcname NOT IN ('pg_default', 'pg_global')
                AND t.oid IN (SELECT reltablespace FROM pg_class
                              UNION SELECT dattablespace FROM pg_database
                                     WHERE datname = current_database())
              ORDER BY 1",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(q)?;
        let database_owner: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database
              WHERE datname = current_database() AND datdba >= {FIRST_NORMAL_OID}"
        )))
        .fetch_optional(&mut *conn)
        .await
        .map_err(q)?;
        Ok(Globals {
            database_owner,
            roles,
            memberships: memberships
                .into_iter()
                .map(|(role, member, admin_option)| Membership {
                    role,
                    member,
                    admin_option,
                })
                .collect(),
            tablespaces: tablespaces
                .into_iter()
                .map(|(name, location)| Tablespace { name, location })
                .collect(),
        })
    }

    /// Creates the roles of `globals` that do not exist on this server and grants the
    /// memberships that are missing, in one transaction (all or nothing). Existing
    /// roles are never altered. Refused, before anything changes, when a tablespace is
    /// missing or when roles are missing and we may not create roles.
    pub async fn create_missing_globals(&self, globals: &Globals) -> Result<Created, GlobalsError> {
        // Password hashes travel in CREATE ROLE: never in a debug log.
        let mut conn = self.maintenance_unlogged().await?;
        let q = |e| GlobalsError::Db(self.query_error(e));
        let existing_spaces: Vec<String> =
            sqlx::query_scalar("SELECT spcname::text FROM pg_tablespace")
                .fetch_all(&mut conn)
                .await
                .map_err(q)?;
        let missing_spaces: Vec<String> = globals
            .tablespaces
            .iter()
            .filter(|t| !existing_spaces.contains(&t.name))
            .map(|t| {
                format!(
                    "{} (at {} on the backed-up server)",
                    quote(&t.name),
                    t.location
                )
            })
            .collect();
        if !missing_spaces.is_empty() {
            return Err(GlobalsError::MissingTablespaces(missing_spaces.join(", ")));
        }
        let existing_roles: Vec<String> = sqlx::query_scalar("SELECT rolname::text FROM pg_roles")
            .fetch_all(&mut conn)
            .await
            .map_err(q)?;
        let (missing, present): (Vec<&Role>, Vec<&Role>) = globals
            .roles
            .iter()
            .partition(|r| !existing_roles.contains(&r.name));
        if !missing.is_empty() {
            let (me, allowed): (String, bool) = sqlx::query_as(
                "SELECT current_user::text, rolsuper OR rolcreaterole FROM pg_roles
                  WHERE rolname = current_user",
            )
            .fetch_one(&mut conn)
            .await
            .map_err(q)?;
            if !allowed {
                let names: Vec<String> = missing.iter().map(|r| quote(&r.name)).collect();
                return Err(GlobalsError::NoCreateRole(me, names.join(", ")));
            }
        }
        let members: Vec<(String, String)> = sqlx::query_as(
            "SELECT g.rolname::text, m.rolname::text FROM pg_auth_members am
               JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(q)?;
        let mut created = Created {
            existing: present.iter().map(|r| r.name.clone()).collect(),
            ..Created::default()
        };
        // CREATE ROLE and GRANT are transactional: a role that cannot be created
        // (a CREATEROLE restorer and a SUPERUSER role, say) leaves no other behind.
        let mut tx = conn.begin().await.map_err(q)?;
        for role in &missing {
            for sql in create_role_sql(role) {
                sqlx::raw_sql(AssertSqlSafe(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(|source| GlobalsError::Statement {
                        what: format!("create role {}", quote(&role.name)),
                        source,
                    })?;
            }
            created.roles.push(role.name.clone());
        }
        let exists_now = |name: &str| {
            existing_roles.iter().any(|r| r == name) || created.roles.iter().any(|r| r == name)
        };
        let mut granted = Vec::new();
        for m in &globals.memberships {
            let already = members
                .iter()
                .any(|(role, member)| *role == m.role && *member == m.member);
            if already || !exists_now(&m.member) {
                continue;
            }
            if !exists_now(&m.role) {
                created.not_granted.push(format!(
                    "{} → {} (the role is not on this server)",
                    m.role, m.member
                ));
                continue;
            }
            // Between two roles that both existed, a grant would change what an
            // existing role may do (an existing login made a member of an existing
            // admin group): that is altering it, which this never does.
            let new_side = |name: &str| created.roles.iter().any(|r| r == name);
            if !new_side(&m.role) && !new_side(&m.member) {
                created.not_granted.push(format!(
                    "{} → {} (both roles existed; grant it by hand if wanted)",
                    m.role, m.member
                ));
                continue;
            }
            let mut sql = format!("GRANT {} TO {}", quote(&m.role), quote(&m.member));
            if m.admin_option {
                sql.push_str(" WITH ADMIN OPTION");
            }
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(|source| GlobalsError::Statement {
                    what: format!("grant {} to {}", quote(&m.role), quote(&m.member)),
                    source,
                })?;
            granted.push(format!("{} → {}", m.role, m.member));
        }
        created.memberships = granted;
        tx.commit().await.map_err(q)?;
        let _ = conn.close().await;
        Ok(created)
    }

    /// Gives database `name` to `owner` (a role the restore just made sure exists).
    pub async fn set_database_owner(&self, name: &str, owner: &str) -> Result<(), DbError> {
        let mut conn = self.maintenance().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER DATABASE {} OWNER TO {}",
            quote(name),
            quote(owner)
        )))
        .execute(&mut conn)
        .await
        .map_err(|e| self.query_error(e))?;
        Ok(())
    }
}

/// `CREATE ROLE` with every attribute spelled out (the target's defaults may differ),
/// then its role-wide settings.
fn create_role_sql(role: &Role) -> Vec<String> {
    let flag = |on: bool, name: &str| {
        if on {
            name.to_owned()
        } else {
            format!("NO{name}")
        }
    };
    let mut sql = format!(
        "CREATE ROLE {} WITH {} {} {} {} {} {} {} CONNECTION LIMIT {}",
        quote(&role.name),
        flag(role.superuser, "SUPERUSER"),
        flag(role.inherit, "INHERIT"),
        flag(role.createrole, "CREATEROLE"),
        flag(role.createdb, "CREATEDB"),
        flag(role.login, "LOGIN"),
        flag(role.replication, "REPLICATION"),
        flag(role.bypassrls, "BYPASSRLS"),
        role.connection_limit,
    );
    if let Some(until) = &role.valid_until {
        sql.push_str(&format!(" VALID UNTIL {}", quote_literal(until)));
    }
    if let Some(hash) = &role.password {
        // A stored SCRAM/md5 hash is recognised as one and kept as is.
        sql.push_str(&format!(" PASSWORD {}", quote_literal(hash)));
    }
    let mut out = vec![sql];
    for setting in &role.settings {
        if let Some(set) = set_clause(setting) {
            out.push(format!("ALTER ROLE {} {set}", quote(&role.name)));
        }
    }
    out
}

/// `name=value` from `pg_db_role_setting` as `SET "name" TO 'value'`; list settings
/// get one literal per item. `None` for a malformed entry.
fn set_clause(setting: &str) -> Option<String> {
    let (name, value) = setting.split_once('=')?;
    if name.is_empty() {
        return None;
    }
    // `myext.option` is a two-part name: each part quoted on its own.
    let name: Vec<String> = name.split('.').map(quote).collect();
    let values: Vec<String> = if LIST_SETTINGS.contains(&name_lower(setting).as_str()) {
        let items = split_list(value);
        if items.is_empty() {
            // `SET … TO` needs a value: a list with no item at all is the empty string.
            vec![quote_literal("")]
        } else {
            items.iter().map(|v| quote_literal(v)).collect()
        }
    } else {
        vec![quote_literal(value)]
    };
    Some(format!("SET {} TO {}", name.join("."), values.join(", ")))
}

fn name_lower(setting: &str) -> String {
    setting
        .split_once('=')
        .map_or("", |(n, _)| n)
        .to_ascii_lowercase()
}

/// Splits a stored list value (`app, "$user", "a,b"`) into its items, unquoting
/// double-quoted ones. The server stores a list as its items joined by `, `, each
/// either a plain lower-case name or double-quoted (`quote_identifier`): whitespace
/// outside quotes only follows a separating comma, and is dropped; inside quotes it
/// is part of the item (`" lead"`). An item that was quoted is kept even when empty:
/// `""` is the empty-string item of `SET search_path = ''` (without it the list
/// was empty and `SET … TO` a syntax error that failed the whole restore).
fn split_list(value: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                item.push('"');
                chars.next();
            }
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            ',' if !quoted => {
                if !item.is_empty() || was_quoted {
                    items.push(std::mem::take(&mut item));
                }
                was_quoted = false;
            }
            c if c.is_whitespace() && !quoted => {}
            c => item.push(c),
        }
    }
    if !item.is_empty() || was_quoted {
        items.push(item);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_quoted_set_clauses() {
        assert_eq!(
            set_clause("work_mem=64MB").as_deref(),
            Some("SET \"work_mem\" TO '64MB'")
        );
        assert_eq!(
            set_clause("search_path=app, \"$user\", \"a,b\"\"c\"").as_deref(),
            Some("SET \"search_path\" TO 'app', '$user', 'a,b\"c'")
        );
        assert_eq!(
            set_clause("myext.opt=it's").as_deref(),
            Some("SET \"myext\".\"opt\" TO 'it''s'")
        );
        assert_eq!(set_clause("nonsense"), None);
        // Found by tests/roles_oracle.rs: `SET search_path = ''` is stored as `""`
        // (it made `SET … TO` with no value, and the restore failed), and quoted
        // spaces are part of an item.
        assert_eq!(
            set_clause("search_path=\"\"").as_deref(),
            Some("SET \"search_path\" TO ''")
        );
        assert_eq!(
            set_clause("search_path=\" lead\", \"\", \"trail \", app").as_deref(),
            Some("SET \"search_path\" TO ' lead', '', 'trail ', 'app'")
        );
        assert_eq!(
            set_clause("temp_tablespaces=").as_deref(),
            Some("SET \"temp_tablespaces\" TO ''")
        );
    }

    #[test]
    fn create_role_spells_out_every_attribute_and_never_logs_the_hash() {
        let role = Role {
            name: "we\"ird".to_owned(),
            login: true,
            inherit: true,
            connection_limit: 5,
            valid_until: Some("2030-01-01 00:00:00+00".to_owned()),
            password: Some("SCRAM-SHA-256$4096:secret".to_owned()),
            settings: vec!["statement_timeout=5s".to_owned()],
            ..Role::default()
        };
        let sql = create_role_sql(&role);
        assert_eq!(
            sql[0],
            "CREATE ROLE \"we\"\"ird\" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN \
             NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 5 VALID UNTIL '2030-01-01 00:00:00+00' \
             PASSWORD 'SCRAM-SHA-256$4096:secret'"
        );
        assert_eq!(
            sql[1],
            "ALTER ROLE \"we\"\"ird\" SET \"statement_timeout\" TO '5s'"
        );
        assert!(!format!("{role:?}").contains("secret"));
    }
}
