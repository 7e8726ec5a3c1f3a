//! `pgoutbox import-debezium FILE`: the configuration on stdout, what was
//! not carried over on stderr.

use std::io::Read;
use std::path::Path;

use crate::operate::debezium_import;

/// Reads `file` (`-` for stdin), prints the pgoutbox configuration on
/// stdout and one `warning:` line per option not carried over on stderr.
/// The error says what is wrong with the input.
pub fn import_debezium(file: &Path) -> Result<(), String> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading stdin: {e}"))?;
        text
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?
    };
    let options = debezium_import::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let imported =
        debezium_import::convert(&options).map_err(|e| format!("{}: {e}", file.display()))?;
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", imported.toml);
    Ok(())
}
