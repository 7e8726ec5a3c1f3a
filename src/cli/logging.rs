//! `tracing` set-up shared by every command: the filter and format from the
//! configuration, on stderr, coloured only on a terminal.

use std::io::IsTerminal;

use crate::config::Config;

/// Sets up `tracing` from the config (`RUST_LOG` wins over `log.filter`).
/// Text logs are coloured only when stderr is a terminal and `NO_COLOR` is
/// unset or empty (<https://no-color.org>); JSON logs never are.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().with_ansi(false).init();
    } else {
        let no_color = std::env::var_os("NO_COLOR").map(|v| v.to_string_lossy().into_owned());
        let ansi = use_ansi(std::io::stderr().is_terminal(), no_color.as_deref());
        builder.with_ansi(ansi).init();
    }
}

/// Whether text logs get ANSI colours: only on a terminal, and only when
/// `NO_COLOR` is unset or empty (<https://no-color.org>). Logs written to a
/// file or a pipe stay plain.
fn use_ansi(is_terminal: bool, no_color: Option<&str>) -> bool {
    is_terminal && no_color.is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::use_ansi;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        // An empty NO_COLOR counts as unset.
        assert!(use_ansi(true, Some("")));
        // Any non-empty value turns colours off, whatever it says.
        assert!(!use_ansi(true, Some("1")));
        assert!(!use_ansi(true, Some("0")));
        assert!(!use_ansi(true, Some("false")));
    }

    #[test]
    fn a_file_or_a_pipe_gets_plain_logs() {
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(false, Some("")));
        assert!(!use_ansi(false, Some("1")));
    }
}
