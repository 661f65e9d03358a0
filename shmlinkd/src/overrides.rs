//! The command-line flags that override single configuration values.

use shmlink_server::config::Config;

/// Command-line flags that override single configuration values
/// (`#[command(flatten)]` in shmlinkd's arguments). Unset flags leave the
/// file's (or the default) value.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct Overrides {
    /// Override limits.max_capacity (bytes per ring).
    #[arg(long, value_name = "BYTES")]
    pub max_capacity: Option<u64>,
    /// Override limits.max_message (bytes per message).
    #[arg(long, value_name = "BYTES")]
    pub max_message: Option<u64>,
    /// Override limits.sessions_per_connection.
    #[arg(long, value_name = "N")]
    pub sessions_per_connection: Option<u32>,
    /// Override limits.sessions_per_user.
    #[arg(long, value_name = "N")]
    pub sessions_per_user: Option<u32>,
    /// Override limits.memory_per_user (bytes).
    #[arg(long, value_name = "BYTES")]
    pub memory_per_user: Option<u64>,
    /// Override limits.memory_total (bytes).
    #[arg(long, value_name = "BYTES")]
    pub memory_total: Option<u64>,
    /// Override engine.workers (0: one per CPU).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Override providers.accept_timeout_ms.
    #[arg(long, value_name = "MS")]
    pub accept_timeout_ms: Option<u64>,
}

impl Overrides {
    /// Writes every flag that was given into `config`; call
    /// [`Config::validate`] afterwards.
    pub fn apply(&self, config: &mut Config) {
        let Overrides {
            max_capacity,
            max_message,
            sessions_per_connection,
            sessions_per_user,
            memory_per_user,
            memory_total,
            workers,
            accept_timeout_ms,
        } = *self;
        let limits = &mut config.limits;
        set(&mut limits.max_capacity, max_capacity);
        set(&mut limits.max_message, max_message);
        set(&mut limits.sessions_per_connection, sessions_per_connection);
        set(&mut limits.sessions_per_user, sessions_per_user);
        set(&mut limits.memory_per_user, memory_per_user);
        set(&mut limits.memory_total, memory_total);
        set(&mut config.engine.workers, workers);
        set(&mut config.providers.accept_timeout_ms, accept_timeout_ms);
    }
}

/// Replaces `field` with `value` when there is one.
fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shmlink_server::config::Limits;

    #[test]
    fn overrides_replace_only_the_flags_given() {
        let file = Config::parse(
            "[limits]\nmax_capacity = 4096\nsessions_per_user = 3\n[engine]\nworkers = 2\n",
            "t",
        )
        .unwrap();

        let mut cfg = file.clone();
        Overrides::default().apply(&mut cfg);
        assert_eq!(cfg, file);

        let all = Overrides {
            max_capacity: Some(1 << 20),
            max_message: Some(1000),
            sessions_per_connection: Some(5),
            sessions_per_user: Some(6),
            memory_per_user: Some(1 << 24),
            memory_total: Some(1 << 25),
            workers: Some(4),
            accept_timeout_ms: Some(250),
        };
        let mut cfg = file.clone();
        all.apply(&mut cfg);
        let expected = Limits {
            max_capacity: 1 << 20,
            max_message: 1000,
            sessions_per_connection: 5,
            sessions_per_user: 6,
            memory_per_user: 1 << 24,
            memory_total: 1 << 25,
            reply_fds: None,
        };
        assert_eq!(cfg.limits, expected);
        assert_eq!(cfg.engine.workers, 4);
        assert_eq!(cfg.providers.accept_timeout_ms, 250);
        assert_eq!(cfg.services, file.services);
    }

    #[test]
    fn overrides_parse_from_their_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            overrides: Overrides,
        }
        let cli = Cli::try_parse_from([
            "shmlinkd",
            "--max-capacity=65536",
            "--max-message=4096",
            "--sessions-per-connection=1",
            "--sessions-per-user=2",
            "--memory-per-user=1048576",
            "--memory-total=2097152",
            "--workers=3",
            "--accept-timeout-ms=100",
        ])
        .unwrap();
        assert_eq!(
            cli.overrides,
            Overrides {
                max_capacity: Some(65536),
                max_message: Some(4096),
                sessions_per_connection: Some(1),
                sessions_per_user: Some(2),
                memory_per_user: Some(1 << 20),
                memory_total: Some(2 << 20),
                workers: Some(3),
                accept_timeout_ms: Some(100),
            }
        );
        assert!(Cli::try_parse_from(["shmlinkd", "--max-capacity=lots"]).is_err());
    }
}
