//! `[[files]]`: directories backed up like databases (a tar stream through the same
//! archive pipeline), and their validation.
//!
//! A files set shares the database namespace: its name is the `database` label of
//! its metrics, the folder of its backups and the first part of its job id
//! (`<name>.backup`), so a name used by both is refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::{check_name, BackupConfig, Config, ConfigError};

/// `[[files]]`: one directory tree and its backup job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FilesConfig {
    /// The file this set was configured in (not a key; set at load).
    #[serde(skip)]
    pub source: PathBuf,
    /// Short name used in the job id (`<name>.backup`), metric labels and backup
    /// paths: letters, digits, `_` and `-`; no database may have the same name.
    /// Required.
    pub name: String,
    /// The directory to back up (a relative path is read from the directory of the
    /// config file declaring it). Its contents are stored relative to it;
    /// symbolic links are stored as links, never followed. Required.
    pub path: PathBuf,
    /// Glob patterns, relative to `path`, of entries to leave out (`"cache/**"`,
    /// `"*.tmp"`; `*` does not cross `/`, `**` does; `dir/**` leaves out `dir`
    /// itself too). A directory that matches is left out with everything below it.
    /// Default: none.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `[files.backup]`: the same keys as `[database.backup]` (schedule,
    /// destination(s), encryption, compression, level, keep, verify, …); `verify =
    /// "restore"` extracts into a scratch directory. Required.
    pub backup: BackupConfig,
}

impl FilesConfig {
    /// The `exclude` patterns, compiled.
    pub fn excludes(&self) -> Result<GlobSet, globset::Error> {
        compile(&self.exclude)
    }
}

fn compile(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        // `cache/**` leaves out the folder itself too, not only what is in it.
        let folder = p.strip_suffix("/**").filter(|f| !f.is_empty());
        for p in std::iter::once(p.as_str()).chain(folder) {
            set.add(
                globset::GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()?,
            );
        }
    }
    set.build()
}

impl Config {
    /// The `[[files]]` entries: names unique among databases and files sets, an
    /// absolute path, patterns that compile, and the backup keys as for a database.
    pub(super) fn validate_files(&self) -> Result<(), ConfigError> {
        for db in &self.databases {
            let Some(b) = &db.backup else { continue };
            for name in &b.with_files {
                if !self.files.iter().any(|f| &f.name == name) {
                    return Err(self.invalid(
                        format!("database \"{}\".backup.with-files", db.name),
                        format!("\"{name}\" is not a [[files]] set; add one with that name or remove it here"),
                    ));
                }
            }
        }
        let mut names: HashSet<&str> = self.databases.iter().map(|d| d.name.as_str()).collect();
        for f in &self.files {
            let key = format!("files \"{}\"", f.name);
            check_name(&f.name).map_err(|m| self.invalid(format!("{key}.name"), m))?;
            if !names.insert(f.name.as_str()) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    "is already the name of a database or another files set; files sets share the database names (job ids, metric labels, backup folders): pick another",
                ));
            }
            for p in &f.exclude {
                Glob::new(p).map_err(|e| {
                    self.invalid(
                        format!("{key}.exclude"),
                        format!("{p:?} is not a glob pattern ({e}); write one like \"cache/**\" or \"*.tmp\""),
                    )
                })?;
            }
            let path = resolve_path(&f.path);
            for (what, dir) in self.kept_dirs() {
                if paths_overlap(&resolve_path(&dir), &path) {
                    return Err(self.invalid(
                        format!("{key}.path"),
                        format!(
                            "{} and {what} {} lie inside one another (comparing the paths with symbolic links resolved): each backup would hold dbkeeper's own files, and restoring the set would delete them; keep them side by side",
                            f.path.display(),
                            dir.display()
                        ),
                    ));
                }
            }
            let backup_key = format!("{key}.backup");
            if !f.backup.with_files.is_empty() {
                return Err(self.invalid(
                    format!("{backup_key}.with-files"),
                    "is for [database.backup] only: a files set is taken with a database, not the other way round; remove it",
                ));
            }
            self.validate_job_options(&backup_key, &f.backup.options(self.notify.as_ref()))?;
            self.validate_backup(&key, &f.backup)?;
        }
        Ok(())
    }
}

impl Config {
    /// Every folder dbkeeper keeps its own data in, named for messages: the local
    /// destinations of every database and files set, and the state dir. No files
    /// set may hold one, and `restore --to` never writes over one.
    pub fn kept_dirs(&self) -> Vec<(String, PathBuf)> {
        let mut dirs = vec![("the state dir".to_owned(), self.daemon.state_dir.clone())];
        let backups = self
            .databases
            .iter()
            .filter_map(|d| Some((format!("database \"{}\"", d.name), d.backup.as_ref()?)))
            .chain(
                self.files
                    .iter()
                    .map(|f| (format!("files set \"{}\"", f.name), &f.backup)),
            );
        for (whose, b) in backups {
            for d in &b.destination {
                if let Some(dir) = d.local_dir() {
                    dirs.push((format!("the backup destination of {whose}"), dir.to_owned()));
                }
            }
        }
        dirs
    }
}

/// A path a restore may never write over or into, and whose it is.
#[derive(Debug, Clone)]
pub struct Protected {
    /// What it is, for messages: `the state dir`, `the key file`, …
    pub what: String,
    pub path: PathBuf,
    /// The configured SQLite database this file belongs to (its file, `-wal`,
    /// `-shm` or `-journal`): the application's live data rather than dbkeeper's
    /// own, which a restore's message names.
    pub database: Option<String>,
}

impl Protected {
    fn own(what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Protected {
            what: what.into(),
            path: path.into(),
            database: None,
        }
    }
}

/// The files SQLite keeps beside a database: with the database file they are its data.
pub const SQLITE_SIBLINGS: [&str; 3] = ["-wal", "-shm", "-journal"];

impl Config {
    /// What a restore may never write over or into: [`Config::kept_dirs`], the
    /// configuration files, every key, password and credentials file, the files a
    /// PostgreSQL URL names (TLS certificates and keys, `passfile`) and the
    /// migrations folders (losing a key loses every archive made with it; losing a
    /// credentials file or a certificate cuts the daemon off from a destination or
    /// a server). A SQLite restore's target file is checked against these.
    pub fn protected_paths(&self) -> Vec<Protected> {
        let mut paths: Vec<Protected> = self
            .kept_dirs()
            .into_iter()
            .map(|(what, dir)| Protected::own(what, dir))
            .collect();
        paths.push(Protected::own("the configuration file", &self.path));
        for f in &self.drop_ins {
            paths.push(Protected::own("the drop-in", f));
        }
        let backups = self
            .databases
            .iter()
            .filter_map(|d| d.backup.as_ref())
            .chain(self.files.iter().map(|f| &f.backup));
        for b in backups {
            for k in b.encryption_key_file.iter().chain(&b.decryption_key_files) {
                paths.push(Protected::own("the key file", k));
            }
            for k in &b.identity_files {
                paths.push(Protected::own("the identity file", k));
            }
            for d in &b.destination.0 {
                if let Some(f) = &d.settings.credentials_file {
                    paths.push(Protected::own(
                        format!("the credentials file of destination {}", d.label()),
                        f,
                    ));
                }
            }
        }
        if let Some(f) = &self.daemon.coordination_password_file {
            paths.push(Protected::own("the coordination password file", f));
        }
        for d in &self.databases {
            if let Some(f) = &d.password_file {
                paths.push(Protected::own("the password file", f));
            }
            if super::Backend::from_url(&d.url).ok() == Some(super::Backend::Postgres) {
                for (param, f) in crate::pgurl::named_files(&d.url) {
                    paths.push(Protected::own(
                        format!("the {param} of database \"{}\"", d.name),
                        f,
                    ));
                }
            }
            if let Some(dir) = d.migrate.as_ref().and_then(|m| m.dir.as_ref()) {
                paths.push(Protected::own(
                    format!("the migrations folder of database \"{}\"", d.name),
                    dir,
                ));
            }
        }
        paths
    }

    /// [`Config::protected_paths`] and every configured SQLite database with its
    /// `-wal`, `-shm` and `-journal`: what a files restore (which replaces a whole
    /// directory) may never write over or into. A SQLite restore may replace a
    /// database file (that is what it is for), so its target is not checked
    /// against these.
    pub fn restore_dir_protected(&self) -> Vec<Protected> {
        let mut paths = self.protected_paths();
        paths.extend(self.sqlite_files(true));
        paths
    }

    /// What a SQLite restore's target file may not be: [`Config::protected_paths`]
    /// and the `-wal`, `-shm` and `-journal` files of every configured SQLite
    /// database (a restore onto a database's own file is what it is for; onto its
    /// write-ahead log it would drop the transactions the log holds).
    pub fn sqlite_restore_protected(&self) -> Vec<Protected> {
        let mut paths = self.protected_paths();
        paths.extend(self.sqlite_files(false));
        paths
    }

    /// Every configured SQLite database's companion files (and, with `with_db`, the
    /// database file itself).
    fn sqlite_files(&self, with_db: bool) -> Vec<Protected> {
        let mut paths = Vec::new();
        for d in &self.databases {
            let Some(file) = d.sqlite_file() else {
                continue;
            };
            let siblings = SQLITE_SIBLINGS.iter().map(|s| {
                let mut name = file.clone().into_os_string();
                name.push(s);
                PathBuf::from(name)
            });
            let own = with_db.then(|| file.clone());
            for f in own.into_iter().chain(siblings) {
                paths.push(Protected {
                    what: format!("the SQLite file of database \"{}\"", d.name),
                    path: f,
                    database: Some(d.name.clone()),
                });
            }
        }
        paths
    }
}

impl Config {
    /// The `backend` the backups of the database or files set `name` have: `files`,
    /// `sqlite` or `postgres` (`None` for a name not configured).
    pub fn backend_of(&self, name: &str) -> Option<&'static str> {
        if self.files.iter().any(|f| f.name == name) {
            return Some(FILES_BACKEND);
        }
        let db = self.databases.iter().find(|d| d.name == name)?;
        super::Backend::from_url(&db.url)
            .ok()
            .map(super::Backend::as_str)
    }
}

/// The `backend` of a files set's header and manifest.
pub const FILES_BACKEND: &str = "files";

/// `path` absolute, with symbolic links resolved as far as it exists: the canonical
/// form of its nearest existing ancestor, then the rest as written.
pub fn resolve_path(path: &Path) -> PathBuf {
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut rest = Vec::new();
    let mut at = path.as_path();
    loop {
        if let Ok(real) = at.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return path,
        }
    }
}

/// Whether one of the two paths lies inside the other (or they are the same).
pub fn paths_overlap(path: &Path, other: &Path) -> bool {
    path.starts_with(other) || other.starts_with(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_stays_in_its_folder_and_double_star_crosses() {
        let set = compile(&["*.tmp".to_owned(), "cache/**".to_owned()]).unwrap();
        assert!(set.is_match("a.tmp"));
        assert!(!set.is_match("sub/a.tmp"));
        assert!(set.is_match("cache/x/y"));
        assert!(set.is_match("cache"), "the folder itself");
        assert!(!set.is_match("cached"));
    }

    #[test]
    fn paths_resolve_through_links_as_far_as_they_exist() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let canon = real.canonicalize().unwrap();
        assert_eq!(
            resolve_path(&dir.path().join("link/not/yet")),
            canon.join("not/yet")
        );
        assert!(paths_overlap(
            &canon,
            &resolve_path(&dir.path().join("link/x"))
        ));
        assert!(!paths_overlap(&canon, &canon.with_file_name("realm")));
    }
}
