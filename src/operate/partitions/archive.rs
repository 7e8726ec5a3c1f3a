//! Partition archives: each retired partition's rows, written as gzip JSON
//! lines to `--archive-dir` before it is dropped (see the parent module).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{db, Candidate, MaintainOptions};
use crate::config::Config;
use crate::error::Error;

/// Rows fetched from the export cursor at a time.
const EXPORT_BATCH: i32 = 5_000;

/// With an archive directory, exports the detached partition to its
/// archive file; returns the file and the rows written.
pub(super) async fn archive(
    tx: &tokio_postgres::Transaction<'_>,
    config: &Config,
    c: &Candidate,
    options: &MaintainOptions,
) -> Result<Option<(PathBuf, u64)>, Error> {
    let Some(dir) = &options.archive_dir else {
        return Ok(None);
    };
    let path = archive_path(dir, config, c);
    let rows = export(tx, &c.qualified, &path).await?;
    Ok(Some((path, rows)))
}

/// `<dir>/<schema>.<table>.<start>--<end>.jsonl.gz`, times as
/// `YYYYMMDDTHHMMSSZ` (UTC; `min` for MINVALUE).
pub(super) fn archive_path(dir: &Path, config: &Config, c: &Candidate) -> PathBuf {
    dir.join(format!(
        "{}.{}.{}--{}.jsonl.gz",
        config.outbox.schema, config.outbox.table, c.compact_start, c.compact_end
    ))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Fatal(format!("archive: {what} {}: {e}", path.display()))
}

/// Creates the archive directory if needed and proves it writable, before
/// anything is changed.
pub(super) fn check_archive_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("cannot create", dir, e))?;
    let probe = dir.join(format!(".pgoutbox-probe-{}", std::process::id()));
    File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe").and_then(|_| f.sync_all()))
        .map_err(|e| io_error("cannot write in", dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| io_error("cannot remove", &probe, e))?;
    Ok(())
}

/// Writes every row of `partition` to `path` as gzip JSON lines; returns how
/// many. Durable (file and directory fsynced) when it returns `Ok`; on an
/// error the partial file is removed.
async fn export(
    tx: &tokio_postgres::Transaction<'_>,
    partition: &str,
    path: &Path,
) -> Result<u64, Error> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let result = export_to(tx, partition, path, &partial).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

async fn export_to(
    tx: &tokio_postgres::Transaction<'_>,
    partition: &str,
    path: &Path,
    partial: &Path,
) -> Result<u64, Error> {
    let file = File::create(partial).map_err(|e| io_error("cannot create", partial, e))?;
    let mut gz =
        flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
    tx.batch_execute(&format!(
        "DECLARE pgoutbox_export NO SCROLL CURSOR FOR \
         SELECT row_to_json(t)::text FROM ONLY {partition} t ORDER BY created_at, id"
    ))
    .await
    .map_err(db("reading the partition to archive"))?;
    let fetch = format!("FETCH {EXPORT_BATCH} FROM pgoutbox_export");
    let mut rows = 0u64;
    loop {
        let batch = tx
            .query(&fetch, &[])
            .await
            .map_err(db("reading the partition to archive"))?;
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            let line: &str = r.get(0);
            gz.write_all(line.as_bytes())
                .and_then(|_| gz.write_all(b"\n"))
                .map_err(|e| io_error("cannot write", partial, e))?;
            rows += 1;
        }
    }
    tx.batch_execute("CLOSE pgoutbox_export")
        .await
        .map_err(db("closing the export cursor"))?;
    let file = gz
        .finish()
        .map_err(|e| io_error("cannot write", partial, e))?
        .into_inner()
        .map_err(|e| io_error("cannot write", partial, e.into_error()))?;
    file.sync_all()
        .map_err(|e| io_error("cannot fsync", partial, e))?;
    drop(file);
    std::fs::rename(partial, path).map_err(|e| io_error("cannot rename to", path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot fsync the directory", dir, e))?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_carry_table_and_range() {
        let mut config = Config::default();
        config.outbox.schema = "shop".into();
        let c = Candidate {
            qualified: String::new(),
            display: String::new(),
            range_start: None,
            range_end: None,
            compact_start: "20250101T000000Z".into(),
            compact_end: "20250201T000000Z".into(),
        };
        assert_eq!(
            archive_path(Path::new("/a"), &config, &c),
            Path::new("/a/shop.outbox.20250101T000000Z--20250201T000000Z.jsonl.gz")
        );
    }
}
