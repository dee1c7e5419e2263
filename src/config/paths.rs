//! Where a relative path written in a configuration file points: the directory of
//! the file that declares it (the main file or its drop-in), never the working
//! directory of whoever runs a command. One-shot commands (`restore`, `run-job`,
//! `backup prune`) are run from anywhere by an operator; if `var/app.db` meant
//! "`var/app.db` below wherever I happen to be", a restore run from another
//! directory would protect, back up or rotate other files than the daemon's.
//!
//! Every path key is made absolute once, while its file is read, so that
//! validation, messages and every reader see the file actually used.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{is_bare_name, Backend, Config, ConfigError};

impl Config {
    /// Makes every relative path this file (`file`, already parsed into `self`)
    /// declares absolute, read from `file`'s directory. A bare secret file name is
    /// a systemd credential while `$CREDENTIALS_DIRECTORY` is set.
    pub(super) fn anchor_paths(&mut self, file: &Path) -> Result<(), ConfigError> {
        let base = base_dir(file);
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY");
        let mut bare = Vec::new();
        let mut secret = |p: &mut PathBuf| {
            let resolved = resolve_secret(&base, p, creds.as_deref());
            if is_bare_name(p) && creds.as_ref().is_none_or(|c| c.is_empty()) {
                bare.push(resolved.clone());
            }
            *p = resolved;
        };
        self.daemon.state_dir = anchored(&base, &self.daemon.state_dir);
        if let Some(f) = &mut self.daemon.coordination_password_file {
            secret(f);
        }
        for db in &mut self.databases {
            db.url = anchor_url(&base, &db.url).map_err(|message| ConfigError::Invalid {
                path: file.to_owned(),
                key: format!("database \"{}\".url", db.name),
                message,
            })?;
            if let Some(f) = &mut db.password_file {
                secret(f);
            }
            if let Some(dir) = db.migrate.as_mut().and_then(|m| m.dir.as_mut()) {
                *dir = anchored(&base, dir);
            }
        }
        for f in &mut self.files {
            f.path = anchored(&base, &f.path);
        }
        let dbs = self.databases.iter_mut().filter_map(|d| d.backup.as_mut());
        for b in dbs.chain(self.files.iter_mut().map(|f| &mut f.backup)) {
            if let Some(f) = &mut b.encryption_key_file {
                secret(f);
            }
            b.decryption_key_files.iter_mut().for_each(&mut secret);
            if let Some(f) = &mut b.recipients_file {
                *f = anchored(&base, f);
            }
            b.identity_files.iter_mut().for_each(&mut secret);
            for d in &mut b.destination.0 {
                if let super::Location::Local(dir) = &mut d.location {
                    *dir = anchored(&base, dir);
                }
                if let Some(f) = &mut d.settings.credentials_file {
                    secret(f);
                }
            }
            b.pg_dump = program(&base, &b.pg_dump);
            b.pg_restore = program(&base, &b.pg_restore);
        }
        self.bare_credentials.extend(bare);
        Ok(())
    }
}

/// `file` with every symbolic link resolved (it must exist).
pub(super) fn real_file(file: &Path) -> Result<PathBuf, ConfigError> {
    file.canonicalize().map_err(|source| ConfigError::Read {
        path: file.to_owned(),
        source,
    })
}

/// A main file named through a link (`given`) has its drop-ins beside the real file
/// (`real`); a `conf.d` beside the link, which would be ignored, is refused.
pub(super) fn no_drop_ins_beside_link(given: &Path, real: &Path) -> Result<(), ConfigError> {
    let beside_link = super::drop_in_dir(&std::path::absolute(given).unwrap_or_default());
    let beside_real = super::drop_in_dir(real);
    let same = match (beside_link.canonicalize(), beside_real.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), _) => true,
        (Ok(_), Err(_)) => false,
    };
    if same {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        path: given.to_owned(),
        key: "conf.d".to_owned(),
        message: format!(
            "{} is a symbolic link to {}, whose drop-ins are read from {} (a file's relative paths and drop-ins are those beside the real file); {} beside the link would be ignored: move its files to {}, or point -c at a file that is not a link",
            given.display(),
            real.display(),
            beside_real.display(),
            beside_link.display(),
            beside_real.display()
        ),
    })
}

/// The directory relative paths in `file` are read from: canonical (symbolic links
/// resolved) when it exists, else absolute.
pub(super) fn base_dir(file: &Path) -> PathBuf {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    dir.canonicalize()
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_owned())
}

/// `path` if absolute, else `path` below `base`. Leading `..` climb `base` (which
/// [`base_dir`] made canonical, so that is what the kernel would do); a later `..`
/// is left as written, since what comes before it may be a symbolic link.
fn anchored(base: &Path, path: &Path) -> PathBuf {
    use std::path::Component;
    if path.is_absolute() || path.as_os_str().is_empty() {
        return path.to_owned();
    }
    let mut out = base.to_owned();
    let mut parts = path.components().peekable();
    while let Some(part @ (Component::ParentDir | Component::CurDir)) = parts.peek() {
        if *part == Component::ParentDir {
            out.pop();
        }
        parts.next();
    }
    out.extend(parts);
    out
}

/// A secret file: a bare name is a systemd credential when `creds` (the value of
/// `$CREDENTIALS_DIRECTORY`) is set; anything else is read from `base`.
fn resolve_secret(base: &Path, path: &Path, creds: Option<&OsStr>) -> PathBuf {
    anchored(base, &super::resolve_in(path, creds))
}

/// A program: a bare name is looked up in `$PATH`; a path with a `/` is read from
/// `base`.
fn program(base: &Path, path: &Path) -> PathBuf {
    if path.components().count() > 1 {
        anchored(base, path)
    } else {
        path.to_owned()
    }
}

/// A database URL with its relative file names made absolute: a SQLite database's
/// path, or a PostgreSQL URL's `sslrootcert`, `sslcert`, `sslkey`, `sslcrl` and
/// `passfile`. Anything else (and a URL that cannot be read, refused by validation)
/// is returned as written.
fn anchor_url(base: &Path, url: &str) -> Result<String, String> {
    match Backend::from_url(url) {
        Ok(Backend::Sqlite) => anchor_sqlite_url(base, url),
        Ok(Backend::Postgres) => Ok(crate::pgurl::anchor_files(url, &|p| anchored(base, p))),
        Err(_) => Ok(url.to_owned()),
    }
}

/// `sqlite://var/app.db?mode=rwc` → `sqlite:///etc/dbkeeper/var/app.db?mode=rwc`,
/// the path as sqlx reads it (after `sqlite://` or `sqlite:`, up to `?`,
/// percent-decoded). In-memory databases have no path.
fn anchor_sqlite_url(base: &Path, url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (database, params) = match rest.split_once('?') {
        Some((d, p)) => (d, Some(p)),
        None => (rest, None),
    };
    let in_memory = params.is_some_and(|p| {
        url::form_urlencoded::parse(p.as_bytes()).any(|(k, v)| k == "mode" && v == "memory")
    });
    let decoded = percent_encoding::percent_decode_str(database).decode_utf8_lossy();
    if database.is_empty()
        || in_memory
        || database.starts_with(':')
        || database.starts_with("file:")
        || Path::new(&*decoded).is_absolute()
    {
        return Ok(url.to_owned());
    }
    let file = anchored(base, Path::new(&*decoded));
    let file = file.to_str().ok_or_else(|| {
        format!(
            "names a relative SQLite path, read from the directory of the configuration file, \
             but that directory's path ({}) is not UTF-8, which a URL cannot hold; write the \
             database's absolute path",
            base.display()
        )
    })?;
    // sqlx percent-decodes the path: a `%`, `?` or `#` in it must be encoded.
    let mut out = String::from("sqlite://");
    for c in file.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    if let Some(p) = params {
        out.push('?');
        out.push_str(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn file_of(url: &str) -> PathBuf {
        sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .unwrap()
            .get_filename()
            .to_owned()
    }

    #[test]
    fn relative_sqlite_paths_are_read_from_the_base() {
        let base = Path::new("/etc/dbk");
        for (url, want) in [
            ("sqlite://var/app.db?mode=rwc", "/etc/dbk/var/app.db"),
            ("sqlite:var/app.db", "/etc/dbk/var/app.db"),
            ("sqlite://app.db", "/etc/dbk/app.db"),
            ("sqlite://../data/app.db", "/etc/data/app.db"),
            ("sqlite://./x/../app.db", "/etc/dbk/x/../app.db"),
            ("sqlite://a%3Fb.db", "/etc/dbk/a?b.db"),
            ("sqlite:///abs/app.db", "/abs/app.db"),
        ] {
            let got = anchor_sqlite_url(base, url).unwrap();
            assert_eq!(file_of(&got), Path::new(want), "{url} -> {got}");
        }
        let got = anchor_sqlite_url(base, "sqlite://var/app.db?mode=rwc").unwrap();
        assert!(got.ends_with("?mode=rwc"), "{got}");
    }

    #[test]
    fn in_memory_databases_are_left_alone() {
        let base = Path::new("/etc/dbk");
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://?mode=memory",
            "sqlite://shared?mode=memory&cache=shared",
        ] {
            assert_eq!(anchor_sqlite_url(base, url).unwrap(), url);
        }
    }

    #[test]
    fn odd_characters_in_the_base_survive_the_url() {
        let base = Path::new("/srv/a%b?c#d e");
        let got = anchor_sqlite_url(base, "sqlite://app.db?mode=ro").unwrap();
        assert_eq!(file_of(&got), Path::new("/srv/a%b?c#d e/app.db"));
    }

    #[test]
    fn leading_parent_dirs_climb_the_base_and_later_ones_stay() {
        let base = Path::new("/a/b");
        for (rel, want) in [
            ("x", "/a/b/x"),
            ("./x", "/a/b/x"),
            ("../x", "/a/x"),
            ("../../../x", "/x"),
            ("l/../x", "/a/b/l/../x"),
            ("..", "/a"),
        ] {
            assert_eq!(anchored(base, Path::new(rel)), Path::new(want), "{rel}");
        }
    }

    #[test]
    fn programs_are_anchored_only_with_a_slash() {
        let base = Path::new("/etc/dbk");
        assert_eq!(program(base, Path::new("pg_dump")), Path::new("pg_dump"));
        assert_eq!(
            program(base, Path::new("bin/pg_dump")),
            Path::new("/etc/dbk/bin/pg_dump")
        );
        assert_eq!(
            program(base, Path::new("/usr/bin/pg_dump")),
            Path::new("/usr/bin/pg_dump")
        );
    }

    #[test]
    fn secrets_are_credentials_only_when_bare_and_the_directory_is_set() {
        let base = Path::new("/etc/dbk");
        let creds = Some(OsStr::new("/run/creds/x"));
        assert_eq!(
            resolve_secret(base, Path::new("key"), creds),
            Path::new("/run/creds/x/key")
        );
        assert_eq!(
            resolve_secret(base, Path::new("key"), None),
            Path::new("/etc/dbk/key")
        );
        assert_eq!(
            resolve_secret(base, Path::new("keys/key"), creds),
            Path::new("/etc/dbk/keys/key")
        );
    }
}
