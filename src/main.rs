//! The `wxbroker` binary: configuration, logging, bind, [`wxbroker::run`]; and the offline
//! `export` / `import` / `migrate` commands ([`wxbroker::backup`]); `healthcheck` for containers.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use wxbroker::storage::redis::Redis;
use wxbroker::{Config, Secret, backup};

// Many small allocations freed on other threads: glibc's arenas lock against each other there
// (a quarter of a login's CPU under load); mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line: the broker's settings, and an optional offline command.
#[derive(Parser)]
#[command(
    name = "wxbroker",
    version,
    about = "Session broker for WeChat Mini Program login",
    // After the options rather than a long_about, which would switch --help to the long layout.
    after_help = "Without a command, wxbroker serves. Each setting comes from, in rising precedence: \
        its default, the TOML file of --config (keys are the long flag names, e.g. \
        session_idle_ttl = 3600), the environment, the flag."
)]
struct Cli {
    /// Every setting of the broker, as flags.
    #[command(flatten)]
    config: Config,

    /// What to do instead of serving.
    #[command(subcommand)]
    command: Option<Command>,
}

/// Commands instead of serving: the offline ones open a stopped broker's data dir directly.
#[derive(Subcommand)]
enum Command {
    /// Write every user as one JSON object per line (never a session_key, token or session).
    ///
    /// Each line holds uid, openid, unionid, profile, phone, createdAt and updatedAt, as
    /// /v1/me shows them. Run it on a stopped broker's data dir (a serving broker gives the same
    /// lines at GET /admin/export).
    Export {
        /// Data dir to read [default: the broker's --data-dir, from the flag before the command,
        /// WXBROKER_DATA_DIR or the config file]
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,

        /// File to write (replaced only once the export is complete) [default: standard output]
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read users written by `export` into a data dir, keeping their uids.
    ///
    /// New uids are handed out after the largest one imported. Imported users must log in again
    /// before their encrypted data can be decrypted (no session_key is exported). Run it on a
    /// stopped broker's data dir; a bad line stops the import with its line number, keeping the
    /// lines before it.
    Import {
        /// Data dir to write (created if missing) [default: the broker's --data-dir, from the flag
        /// before the command, WXBROKER_DATA_DIR or the config file]
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,

        /// File to read [default: standard input]
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Move a single-node deployment to a shared Redis: users (uids, session_keys, profiles,
    /// phones) and live sessions, so that nobody has to log in again.
    ///
    /// Run it on a stopped broker's data dir, then start the brokers with WXBROKER_STORE set to
    /// the same Redis URL. Sessions keep their expiry under the session TTL settings.
    Migrate {
        /// Where from: `sled:DIR`, a stopped broker's data dir
        #[arg(long, value_name = "sled:DIR")]
        from: String,

        /// Where to: `redis://host:port/db` [default: the broker's --store, from the flag before
        /// the command, WXBROKER_STORE or the config file; keeps a password off the command line]
        #[arg(long, value_name = "URL")]
        to: Option<Secret>,

        /// Copy again into a Redis that already holds a migration (sessions revoked there since
        /// would come back)
        #[arg(long)]
        force: bool,
    },
    /// Ask the broker for GET /healthz: exit 0 when it answers 200, 1 otherwise.
    ///
    /// For a container's HEALTHCHECK, where there is no curl. It asks the broker's listen
    /// address (the --listen flag before the command, WXBROKER_LISTEN or the config file); an
    /// unspecified one (0.0.0.0, [::]) on loopback. Gives up after 3 s.
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Config::layered_args::<Cli>(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("wxbroker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Cli { config, command } = Config::parse_layered(args).unwrap_or_else(|e| e.exit());
    let serving = command.is_none();
    init_logging(config.log_format.is_json(), serving);
    // Every file this process writes holds users' data or secrets: the data dir's (sled's
    // included, also those it creates later) and exports are nobody else's to read.
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    if let Some(file) = config.exposed_config_file() {
        tracing::warn!(
            file = %file.display(),
            "the config file holds a secret and its group or others may read it: chmod 600 it"
        );
    }
    let result = match command {
        None => serve(config).await,
        Some(Command::Export { data_dir, output }) => export(&config, data_dir, output),
        Some(Command::Import { data_dir, input }) => import(&config, data_dir, input),
        Some(Command::Migrate { from, to, force }) => migrate(&config, &from, to, force).await,
        Some(Command::Healthcheck) => healthcheck(config.listen),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, without a backtrace: this is for an operator, not a debugger.
            // The offline commands log to stderr, where this line goes anyway: not twice.
            if serving {
                tracing::error!("{e:#}");
            }
            eprintln!("wxbroker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The default app the configuration names (`WECHAT_APPID`, else the first of `[[apps]]`), if any;
/// the offline commands need no secret.
fn configured_default_app(config: &Config) -> Option<&str> {
    let appid = config
        .appid
        .as_ref()
        .or(config.apps.first().map(|app| &app.appid));
    appid.map(String::as_str)
}

/// Human or JSON lines, filtered by `RUST_LOG` (default `info`). The server logs to stdout as it
/// always has; the offline commands log to stderr, since their stdout may be the export itself.
/// Colours only on a terminal.
fn init_logging(json: bool, serving: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, terminal) = if serving {
        let terminal = std::io::stdout().is_terminal();
        (BoxMakeWriter::new(std::io::stdout), terminal)
    } else {
        let terminal = std::io::stderr().is_terminal();
        (BoxMakeWriter::new(std::io::stderr), terminal)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder.with_ansi(false).json().init();
    } else {
        builder.with_ansi(terminal).init();
    }
}

async fn serve(mut config: Config) -> anyhow::Result<()> {
    config.read_secret_files()?;
    config.validate()?;
    // Before binding: a public address is not even opened for a sandbox by accident.
    config.check_sandbox(config.listen)?;
    let listener = wxbroker::bind(config.listen)
        .with_context(|| format!("cannot listen on {} (WXBROKER_LISTEN)", config.listen))?;
    wxbroker::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// `wxbroker export`: every user to `output` (or stdout), flushed (and synced, for a file)
/// before the exit.
fn export(
    config: &Config,
    data_dir: Option<PathBuf>,
    output: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = data_dir.unwrap_or_else(|| config.data_dir.clone());
    let data = backup::open_for_export(&dir, config.cache_mb)?;
    let count = match &output {
        Some(path) => export_to_file(&data, path)?,
        None => backup::export(&data, &mut BufWriter::new(std::io::stdout().lock()))?,
    };
    let to = output
        .as_deref()
        .map_or("standard output".into(), |p| p.display().to_string());
    tracing::info!(users = count, data_dir = %dir.display(), to, "exported");
    Ok(())
}

/// Writes the export beside `path` (0600: it holds users' phone numbers) and renames it into
/// place once complete and on disk, so a failed export never replaces a good backup with half of
/// one.
fn export_to_file(data: &wxbroker::storage::sled::DataDir, path: &Path) -> anyhow::Result<u64> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|file| {
                // A leftover of an earlier export keeps its mode.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                Ok(file)
            })
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut out = BufWriter::new(file);
        let count = backup::export(data, &mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", partial.display()))?;
        std::fs::rename(&partial, path).with_context(|| {
            format!("cannot rename {} to {}", partial.display(), path.display())
        })?;
        Ok(count)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// `wxbroker import`: users from `input` (or stdin) into the data dir, flushed before the exit.
fn import(
    config: &Config,
    data_dir: Option<PathBuf>,
    input: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = data_dir.unwrap_or_else(|| config.data_dir.clone());
    // The input first: a mistyped file name must not leave an empty data dir behind.
    let file = match &input {
        Some(path) => {
            Some(File::open(path).with_context(|| format!("cannot open {}", path.display()))?)
        }
        None => None,
    };
    let from = input
        .as_deref()
        .map_or("standard input".into(), |p| p.display().to_string());
    let data = backup::open_for_import(&dir, config.cache_mb)?;
    let mut config = config.clone();
    config.read_app_list()?;
    let config = &config;
    // Lines without an appid are the default app's: the one configured, if any, must be the one
    // the data dir has recorded, if any.
    if let (Some(appid), Some(held)) = (configured_default_app(config), data.users().default_app()?)
    {
        wxbroker::storage::same_default_app("The data dir", held, appid)?;
    }
    let count = match file {
        Some(file) => backup::import(&data, BufReader::new(file)),
        None => backup::import(&data, std::io::stdin().lock()),
    }
    .with_context(|| format!("import from {from} into {}", dir.display()))?;
    tracing::info!(users = count, data_dir = %dir.display(), from, "imported");
    Ok(())
}

/// `wxbroker migrate --from sled:DIR --to redis://...`.
async fn migrate(
    config: &Config,
    from: &str,
    to: Option<Secret>,
    force: bool,
) -> anyhow::Result<()> {
    let dir = from
        .strip_prefix("sled:")
        .map(PathBuf::from)
        .context("--from must be sled:DIR, the data dir of a stopped broker")?;
    let to = to
        .or_else(|| config.store.clone())
        .context("say where to: --to redis://host:port/db, or WXBROKER_STORE")?;
    let checked = Config {
        store: Some(to.clone()),
        ..Config::default()
    };
    checked.validate_store()?;
    let data = backup::open_for_export(&dir, config.cache_mb)?;
    let redis = Redis::connect(to.expose()).await?;
    // The brokers that will serve on Redis must find there the default app they are given.
    if let (Some(appid), Some(held)) = (configured_default_app(config), redis.default_app().await?)
    {
        wxbroker::storage::same_default_app("Redis", held, appid)?;
    }
    let policy = config.session_policy();
    let moved = backup::migrate_to_redis(&data, &redis, policy, config.clock.now(), force)
        .await
        .with_context(|| format!("migrate from {}", dir.display()))?;
    tracing::info!(
        users = moved.users,
        users_kept = moved.users_kept,
        sessions = moved.sessions,
        from = %dir.display(),
        "migrated to Redis"
    );
    Ok(())
}

/// How long `wxbroker healthcheck` waits for the connection, and again for the answer.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// `wxbroker healthcheck`: `GET /healthz` on the listen address in plain HTTP/1.1 (no HTTP
/// client: it would load the CA bundle first), Ok when the answer is 200.
fn healthcheck(listen: SocketAddr) -> anyhow::Result<()> {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/healthz");
    let status =
        healthz_status(addr).with_context(|| format!("unhealthy: no answer from {url}"))?;
    anyhow::ensure!(status == 200, "unhealthy: {url} answered {status}");
    println!("healthy: {url} answered 200");
    Ok(())
}

/// The status code of the answer to `GET /healthz` at `addr`.
fn healthz_status(addr: SocketAddr) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, HEALTHCHECK_TIMEOUT)?;
    stream.set_read_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    // One write: `write!` would send the request in pieces.
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    // The status line is all it takes: "HTTP/1.1 200 OK".
    let mut line = String::new();
    BufReader::new(stream.take(1024)).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next().map(str::parse::<u16>)) {
        (Some(version), Some(Ok(status))) if version.starts_with("HTTP/1.") => Ok(status),
        _ => anyhow::bail!("not an HTTP answer: {:?}", line.trim_end()),
    }
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
