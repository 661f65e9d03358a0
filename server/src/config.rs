//! Broker configuration: limits and per-service access, from
//! `/etc/shmlink/shmlinkd.toml` (or `--config FILE`); `shmlinkd`'s command-line
//! flags override single values by setting the public fields.
//!
//! ```toml
//! [limits]
//! max_capacity = 67108864          # bytes per ring
//! max_message = 67108864           # bytes per message
//! sessions_per_connection = 128
//! sessions_per_user = 512
//! memory_per_user = 268435456      # bytes per uid: rings, buffers, overhead
//! memory_total = 1073741824        # bytes for all sessions together
//! # reply_fds = 28                 # fds in OpenSession replies to connections on the bus
//!                                  # (half per uid); unset: 28 on the system bus, else no bound
//!
//! [engine]
//! workers = 0                      # 0: one per CPU, at most 8
//!
//! [services.sink]
//! allow_users = [0, 1000]          # uids; absent: everyone
//! allow_groups = [100]             # gids; a caller in any of them may use it
//!
//! [providers]
//! accept_timeout_ms = 5000         # how long a provider may take to accept a session
//! registrations_per_user = 32      # services one uid may register at once
//! # unanswered = 2                 # AcceptSession calls a provider may leave unanswered
//!                                  # (twice that in all); unset: 2 on the system bus, else no bound
//!
//! [providers.allow."sensor.*"]     # a service name, or a prefix ending in `*`
//! allow_users = [1000]             # who may register matching names (root and the
//! allow_groups = [100]             # daemon's own user always may); a registration by a
//!                                  # stronger claim (root, then a rule naming the service,
//!                                  # then the longest pattern) takes a name over
//! ```

use serde::Deserialize;
use shmlink_interfaces::limits as defaults;
use std::collections::BTreeMap;
use std::path::Path;

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shmlink/shmlinkd.toml";

/// A configuration problem, reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid configuration in {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Resource limits the broker enforces per connection, per user and in total.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest ring capacity in bytes.
    pub max_capacity: u64,
    /// Largest message in bytes.
    pub max_message: u64,
    /// Open sessions per bus connection.
    pub sessions_per_connection: u32,
    /// Open sessions per uid.
    pub sessions_per_user: u32,
    /// Memory in bytes one uid's sessions may make the daemon hold: both
    /// rings of every session, a fixed overhead per session, and the message
    /// buffers (being received, queued, fanned out) charged while held.
    pub memory_per_user: u64,
    /// The same memory for all sessions together.
    pub memory_total: u64,
    /// Fds the daemon may have in `OpenSession` replies to connections
    /// still on the bus, in all (half of it per uid); `OpenSessionVia`'s
    /// replies carry none. Unset: 28 on the system bus (whose allowance is 64
    /// fds per sender), no bound on other buses.
    pub reply_fds: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_capacity: defaults::DEFAULT_MAX_CAPACITY,
            max_message: defaults::DEFAULT_MAX_MESSAGE,
            sessions_per_connection: 128,
            sessions_per_user: 512,
            // Bounds the daemon's resident memory: a quarter GiB per user and
            // one GiB in all suit a desktop and a small server alike.
            memory_per_user: 256 << 20,
            memory_total: 1 << 30,
            reply_fds: None,
        }
    }
}

/// Event-loop settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Worker threads; 0 picks one per CPU, at most 8.
    pub workers: usize,
}

/// Who may open sessions with one service. Empty lists mean everyone.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceAccess {
    /// uids allowed.
    pub allow_users: Vec<u32>,
    /// gids allowed (primary or supplementary).
    pub allow_groups: Vec<u32>,
}

impl ServiceAccess {
    /// Whether a caller with `uid` and `gids` may use the service. Root always may.
    pub fn allows(&self, uid: u32, gids: &[u32]) -> bool {
        if uid == 0 || (self.allow_users.is_empty() && self.allow_groups.is_empty()) {
            return true;
        }
        self.allow_users.contains(&uid) || gids.iter().any(|g| self.allow_groups.contains(g))
    }
}

/// Provider processes: who may register which service names, how many,
/// and how long the broker waits for a provider to accept a session.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Providers {
    /// Milliseconds a provider has to answer `AcceptSession` before the
    /// client gets `ProviderUnavailable`.
    pub accept_timeout_ms: u64,
    /// Services one uid may have registered at once.
    pub registrations_per_user: u32,
    /// `AcceptSession` calls a provider may have unanswered (each carries
    /// eight fds the bus charges to the broker until read; twice as many in
    /// all); more opens of its services wait for room. Unset: 2 on the
    /// system bus, no bound on other buses.
    pub unanswered: Option<u32>,
    /// Who may register names matching each pattern: a service name, or a
    /// prefix ending in `*` (`*` alone matches every name). Root and the
    /// daemon's own uid may always register; nobody else may register a
    /// name no pattern allows. A pattern whose lists are both empty allows
    /// everyone, as in `[services.NAME]`.
    pub allow: BTreeMap<String, ServiceAccess>,
}

impl Default for Providers {
    fn default() -> Self {
        Providers {
            accept_timeout_ms: defaults::DEFAULT_ACCEPT_TIMEOUT_MS,
            registrations_per_user: 32,
            unanswered: None,
            allow: BTreeMap::new(),
        }
    }
}

/// Longest accept timeout the configuration accepts: ten minutes.
const MAX_ACCEPT_TIMEOUT_MS: u64 = 600_000;

/// Whether `name` is a valid service name for `RegisterService`: 1 to
/// [`MAX_SERVICE_NAME`](defaults::MAX_SERVICE_NAME) bytes of ASCII letters,
/// digits, `.`, `-` and `_`.
pub fn valid_service_name(name: &str) -> bool {
    (1..=defaults::MAX_SERVICE_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// How strong a registrant's claim to a name is: a registration by a
/// stronger claim takes a name over from a weaker one, so a catch-all
/// pattern cannot be used to squat a name a more specific rule (or root)
/// gives to someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Claim {
    /// Granted by a `[providers.allow]` pattern ending in `*`; the longer
    /// its fixed prefix, the stronger.
    Prefix(usize),
    /// Granted by a `[providers.allow]` table naming the service itself.
    Name,
    /// Root or the daemon's own uid.
    Privileged,
}

impl Providers {
    /// The strongest claim `[providers.allow]` gives a caller with `uid`
    /// and `gids` (neither root nor the daemon's own uid, which the broker
    /// lets through before asking) to `name`; `None`: it may not register it.
    pub fn claim(&self, uid: u32, gids: &[u32], name: &str) -> Option<Claim> {
        self.allow
            .iter()
            .filter(|(pattern, access)| pattern_matches(pattern, name) && access.allows(uid, gids))
            .map(|(pattern, _)| match pattern.strip_suffix('*') {
                Some(prefix) => Claim::Prefix(prefix.len()),
                None => Claim::Name,
            })
            .max()
    }
}

/// Whether the `[providers.allow]` pattern `pattern` covers service `name`.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Resource limits.
    pub limits: Limits,
    /// Event loop.
    pub engine: EngineConfig,
    /// Access rules by service name (built-in and provided services alike).
    pub services: BTreeMap<String, ServiceAccess>,
    /// Provider processes.
    pub providers: Providers,
}

impl Config {
    /// Parses a configuration from TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Reads `path`; when `required` is false a missing file gives the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if l.max_capacity < defaults::MIN_CAPACITY {
            return bad(format!(
                "limits.max_capacity must be at least {}",
                defaults::MIN_CAPACITY
            ));
        }
        if l.max_capacity > 1 << 40 {
            return bad("limits.max_capacity must be at most 1 TiB".into());
        }
        if l.max_message == 0 || l.max_message > defaults::HARD_MAX_MESSAGE {
            return bad(format!(
                "limits.max_message must be between 1 and {}",
                defaults::HARD_MAX_MESSAGE
            ));
        }
        if l.sessions_per_connection == 0 || l.sessions_per_user == 0 {
            return bad(
                "limits.sessions_per_connection and sessions_per_user must be at least 1".into(),
            );
        }
        if l.memory_per_user < 2 * defaults::MIN_CAPACITY
            || l.memory_total < 2 * defaults::MIN_CAPACITY
        {
            return bad(
                "limits.memory_per_user and memory_total must fit at least one session".into(),
            );
        }
        if self.engine.workers > 256 {
            return bad("engine.workers must be at most 256".into());
        }
        let p = &self.providers;
        if !(1..=MAX_ACCEPT_TIMEOUT_MS).contains(&p.accept_timeout_ms) {
            return bad(format!(
                "providers.accept_timeout_ms must be between 1 and {MAX_ACCEPT_TIMEOUT_MS}"
            ));
        }
        for pattern in p.allow.keys() {
            let prefix = pattern.strip_suffix('*').unwrap_or(pattern);
            if !(valid_service_name(prefix) || (prefix.is_empty() && pattern == "*")) {
                return bad(format!(
                    "providers.allow: {pattern:?} is neither a service name (ASCII letters, \
                     digits, '.', '-', '_') nor such a prefix followed by '*'"
                ));
            }
        }
        Ok(())
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.engine.workers > 0 {
            return self.engine.workers;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c = Config::parse(
            "[limits]\nmax_capacity = 4096\n[services.echo]\nallow_users = [1000]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.limits.max_capacity, 4096);
        c.validate().unwrap();
        assert!(c.services["echo"].allows(1000, &[]));
        assert!(!c.services["echo"].allows(1001, &[5]));
        assert!(c.services["echo"].allows(0, &[]));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = Config::parse("[limits]\nmax_capcity = 1\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("max_capcity"), "{e}");
        let c = Config::parse("[limits]\nmax_capacity = 1\n", "f.toml").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_capacity"));
    }

    #[test]
    fn providers_section_parses_with_defaults_and_patterns() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.providers.accept_timeout_ms, 5000);
        assert_eq!(c.providers.registrations_per_user, 32);
        assert!(
            c.providers.claim(1000, &[], "x").is_none(),
            "by default nobody but root and the daemon's user"
        );
        let c = Config::parse(
            "[providers]\naccept_timeout_ms = 200\nregistrations_per_user = 2\n\
             [providers.allow.\"sensor.*\"]\nallow_users = [1000]\n\
             [providers.allow.exact]\nallow_groups = [50]\n\
             [providers.allow.\"open-*\"]\n",
            "t",
        )
        .unwrap();
        c.validate().unwrap();
        let p = &c.providers;
        assert_eq!((p.accept_timeout_ms, p.registrations_per_user), (200, 2));
        assert_eq!(p.claim(1000, &[], "sensor.temp"), Some(Claim::Prefix(7)));
        assert_eq!(p.claim(1001, &[], "sensor.temp"), None, "not listed");
        assert_eq!(p.claim(1000, &[], "sensors"), None, "outside the prefix");
        assert_eq!(
            p.claim(7, &[3, 50], "exact"),
            Some(Claim::Name),
            "listed group"
        );
        assert_eq!(p.claim(7, &[3, 50], "exact2"), None, "exact names only");
        assert_eq!(
            p.claim(7, &[], "open-x"),
            Some(Claim::Prefix(5)),
            "empty lists allow everyone"
        );
        assert!(Claim::Prefix(1) < Claim::Prefix(2));
        assert!(Claim::Prefix(255) < Claim::Name && Claim::Name < Claim::Privileged);
    }

    #[test]
    fn bad_providers_values_are_refused() {
        for (text, needle) in [
            ("[providers]\naccept_timeout_ms = 0\n", "accept_timeout_ms"),
            (
                "[providers]\naccept_timeout_ms = 600001\n",
                "accept_timeout_ms",
            ),
            ("[providers.allow.\"a b\"]\n", "\"a b\""),
            ("[providers.allow.\"a*b\"]\n", "\"a*b\""),
            ("[providers.allow.\"\"]\n", "\"\""),
        ] {
            let e = Config::parse(text, "t").unwrap().validate().unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
        Config::parse("[providers.allow.\"*\"]\n", "t")
            .unwrap()
            .validate()
            .expect("every name");
        let e = Config::parse("[providers]\nbogus = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn service_names() {
        assert!(valid_service_name("org.example_sensor-2"));
        assert!(valid_service_name(&"a".repeat(255)));
        assert!(!valid_service_name(&"a".repeat(256)));
        for bad in ["", "a b", "a/b", "é", "a*"] {
            assert!(!valid_service_name(bad), "{bad:?}");
        }
    }
}
