//! A private apt configuration per Debian suite under `target/vm/apt/<suite>`: its own sources
//! list, package lists, caches and (empty) dpkg status, so that fetching another release's
//! kernel never touches the machine's apt sources. (Adding bookworm-backports to the system's
//! sources makes `apt-get install qemu-system-x86` fail with `qemu-utils : Breaks:
//! qemu-system-common`.) The mirror is the one the machine's own sources use.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

/// The keyring of Debian's archive signing keys (package debian-archive-keyring); it holds
/// the keys of the older releases too.
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Package lists younger than this are not fetched again.
const LISTS_FRESH_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// The Debian archive the machine already uses.
pub struct Mirror {
    pub uri: String,
    signed_by: String,
    /// The sources file it came from, for error messages.
    pub source: PathBuf,
}

/// One parsed source entry (either format), `deb` type only.
struct SourceEntry {
    uris: Vec<String>,
    suites: Vec<String>,
    signed_by: Option<String>,
}

/// Finds the entry of the system's sources that serves the host's own release (e.g.
/// `bookworm`): its URI is the Debian archive mirror. `CONNSCOPE_VM_DEBIAN_MIRROR` overrides.
pub fn system_mirror() -> anyhow::Result<Mirror> {
    if let Ok(uri) = std::env::var("CONNSCOPE_VM_DEBIAN_MIRROR") {
        return Ok(Mirror {
            uri,
            signed_by: DEFAULT_KEYRING.to_owned(),
            source: "CONNSCOPE_VM_DEBIAN_MIRROR".into(),
        });
    }
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_owned))
        })
        .map(|c| c.trim_matches('"').to_owned())
        .context("no VERSION_CODENAME in /etc/os-release (is this Debian?)")?;
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        parts.sort();
        files.extend(parts);
    }
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else { continue };
        let entries = if file.extension().is_some_and(|x| x == "sources") {
            parse_deb822(&text)
        } else {
            parse_one_line(&text)
        };
        for entry in entries {
            if entry.suites.contains(&codename)
                && let Some(uri) = entry.uris.first()
            {
                return Ok(Mirror {
                    uri: uri.trim_end_matches('/').to_owned(),
                    signed_by: entry.signed_by.unwrap_or_else(|| DEFAULT_KEYRING.to_owned()),
                    source: file.clone(),
                });
            }
        }
    }
    bail!(
        "no apt source for suite {codename} in /etc/apt/sources.list or /etc/apt/sources.list.d: \
         set CONNSCOPE_VM_DEBIAN_MIRROR to a Debian mirror URL"
    )
}

/// `deb [options] uri suite components...` lines.
fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            let (options, rest) = match rest.strip_prefix('[') {
                Some(bracketed) => bracketed.split_once(']')?,
                None => ("", rest),
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            let signed_by = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by=").map(str::to_owned));
            Some(SourceEntry { uris: vec![uri], suites: vec![suite], signed_by })
        })
        .collect()
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Signed-By:` fields; blank-line separated).
fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| -> Option<Vec<String>> {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.split_whitespace().map(str::to_owned).collect())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v.first().is_none_or(|e| e != "no"));
        let is_deb = field("Types").is_some_and(|t| t.iter().any(|t| t == "deb"));
        if let (true, true, Some(uris), Some(suites)) =
            (enabled, is_deb, field("URIs"), field("Suites"))
        {
            let signed_by = field("Signed-By").and_then(|v| v.into_iter().next());
            entries.push(SourceEntry { uris, suites, signed_by });
        }
    }
    entries
}

/// apt-get and apt-cache confined to one suite of the mirror.
pub struct PrivateApt {
    dir: PathBuf,
    suite: String,
    mirror_uri: String,
}

impl PrivateApt {
    /// Writes the private sources list for `suite` under `dir`.
    pub fn new(dir: &Path, mirror: &Mirror, suite: &str) -> anyhow::Result<Self> {
        for sub in ["lists/partial", "archives/partial", "cache", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let list = format!("deb [signed-by={}] {} {suite} main\n", mirror.signed_by, mirror.uri);
        fs::write(dir.join("sources.list"), list)?;
        fs::write(dir.join("status"), "")?;
        Ok(Self { dir: dir.to_owned(), suite: suite.to_owned(), mirror_uri: mirror.uri.clone() })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let option = |key: &str, value: &Path| format!("{key}={}", value.display());
        for (key, sub) in [
            ("Dir::Etc::sourcelist", "sources.list"),
            ("Dir::Etc::sourceparts", "sources.list.d"),
            ("Dir::State::Lists", "lists"),
            ("Dir::State::status", "status"),
            ("Dir::Cache", "cache"),
            ("Dir::Cache::archives", "archives"),
        ] {
            cmd.arg("-o").arg(option(key, &self.dir.join(sub)));
        }
        // The files live in the build tree, which apt's `_apt` sandbox user cannot write.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
        cmd
    }

    /// Fetches the suite's package lists unless they are fresh.
    pub fn update(&self) -> anyhow::Result<()> {
        let fresh = fs::read_dir(self.dir.join("lists")).ok().is_some_and(|dir| {
            dir.flatten().any(|e| {
                e.file_name().to_string_lossy().contains("_Packages")
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age < LISTS_FRESH_FOR)
            })
        });
        if fresh {
            return Ok(());
        }
        eprintln!("vm-test: apt-get update for {} from {}", self.suite, self.mirror_uri);
        let output = self
            .command("apt-get")
            .args(["update", "-q"])
            .output()
            .context("running apt-get update")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // apt reports a suite the mirror lacks as an error line ("does not have a Release file").
        if !output.status.success() || stderr.lines().any(|l| l.starts_with("E:")) {
            bail!(
                "the mirror {} does not serve suite {} (apt-get update: {})",
                self.mirror_uri,
                self.suite,
                stderr.lines().find(|l| l.starts_with("E:")).unwrap_or(stderr.trim())
            );
        }
        Ok(())
    }

    /// The `linux-image-*` package a meta package (e.g. `linux-image-amd64`) depends on.
    pub fn image_dependency(&self, meta: &str) -> anyhow::Result<String> {
        let output = self.command("apt-cache").args(["depends", meta]).output()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| {
                let dep = line.trim().strip_prefix("Depends:")?.trim();
                dep.starts_with("linux-image-").then(|| dep.to_owned())
            })
            .with_context(|| format!("{} {} has no linux-image-* dependency", self.suite, meta))
    }

    /// The candidate version of `package`.
    pub fn version(&self, package: &str) -> anyhow::Result<String> {
        let output =
            self.command("apt-cache").args(["show", "--no-all-versions", package]).output()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version: ").map(str::to_owned))
            .with_context(|| format!("apt-cache knows no {package} in {}", self.suite))
    }

    /// `apt-get download package` into `dir`.
    pub fn download(&self, package: &str, dir: &Path) -> anyhow::Result<()> {
        eprintln!("vm-test: apt-get download {package} ({})", self.suite);
        crate::run_checked(
            self.command("apt-get").args(["download", "-q", package]).current_dir(dir),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_stanzas_give_uris_suites_and_keyring() {
        let text = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n\
                    Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n";
        let entries = parse_deb822(text);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].uris, ["http://deb.debian.org/debian"]);
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(
            entries[0].signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
    }

    #[test]
    fn one_line_sources_with_and_without_options() {
        let text = "# deb http://commented.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb http://security.example/debian-security bookworm-security main\n";
        let entries = parse_one_line(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].uris, ["http://mirror.example/debian/"]);
        assert_eq!(entries[0].suites, ["bookworm"]);
        assert_eq!(entries[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(entries[1].suites, ["bookworm-security"]);
        assert_eq!(entries[1].signed_by, None);
    }
}
