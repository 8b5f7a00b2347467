//! The `sluice` command line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sluice_agent::agent::{self, ConfigSource};
use sluice_agent::report::{self, LogFormat};
use sluice_agent::source::{Credentials, Source};

// A sync makes and drops many JSON values on several threads; glibc's per-thread arenas
// kept the freed memory (209 MiB peak RSS at 10,000 objects). mimalloc returns it, and
// allocates faster (docs/performance.md). `main` makes it give freed memory back at once
// (`purge_at_once`) and turns transparent huge pages off (`no_huge_pages`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Pull-mode GitOps agent for Kubernetes: agentk-compatible configuration, server-side
/// apply, and WebAssembly plugins between git and the cluster.
#[derive(Debug, Parser)]
#[command(name = "sluice", version = sluice::VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: keep the cluster equal to the manifest projects of the configuration.
    Run(Box<RunArgs>),
    /// Sync every manifest project once, wait for health, print a summary, and exit: 0 when
    /// every project synced, 1 when one failed, 2 when nothing could start (for CI
    /// pipelines and tests; takes the flags of `run`).
    Sync(Box<RunArgs>),
    /// Select, decode and run the plugins offline; print the objects (like `flux build`).
    Render(RenderArgs),
    /// The same chain for CI: print findings as `file:line: severity: message (plugin,
    /// object)`; exit 1 when the commit would be refused.
    Validate(RenderArgs),
    /// Render, then server-side dry-run against the cluster (KUBECONFIG) and show what would
    /// change, as a unified diff. Exit 0: no change; 1: changes; 2: error.
    Diff {
        #[command(flatten)]
        args: RenderArgs,
        /// The agent's inventory id for this project (`sluice run` uses
        /// `<agent-name>-<project>`), so objects it owns compare equal.
        #[arg(long, default_value = "sluice-local")]
        inventory_id: String,
    },
    /// Each project's state, from the cluster alone (KUBECONFIG): synced commit, last sync
    /// and its result, objects by health, failures. With PROJECT: every object and the
    /// recent Events.
    Status {
        /// A manifest project (as in the configuration, e.g. `group/app`).
        project: Option<String>,
        /// Only inventories in this namespace (default: all namespaces).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format (default: a table).
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Print the manifests that install the agent: Namespace, ServiceAccount, RBAC, the git
    /// token Secret, the Deployment and its Service (`| kubectl apply --server-side -f -`).
    Generate(GenerateArgs),
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// The Kustomize and Helm renderers (WebAssembly modules shipped beside sluice).
    #[command(subcommand)]
    Renderers(RenderersCommand),
}

#[derive(Debug, Subcommand)]
enum RenderersCommand {
    /// Compile the renderers ahead of time, writing `<name>.cwasm` beside each module: an
    /// image build runs it, so that an agent maps them instead of compiling (Helm's compile
    /// takes more memory than an agent is given).
    Compile {
        /// The renderers' directory (default: $SLUICE_RENDERERS_DIR, else `renderers/`
        /// beside the executable).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Agent name: `.gitlab/agents/<name>/` in the configuration repository.
    #[arg(long, default_value = "sluice")]
    agent_name: String,
    /// Namespace the agent runs in.
    #[arg(long, default_value = "sluice-system")]
    agent_namespace: String,
    /// Configuration repository the agent follows.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    config_repo: Option<String>,
    /// A configuration file instead, installed as a ConfigMap (its plugins must then be
    /// `https://` modules).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base URL project paths resolve against.
    #[arg(long, default_value = "https://gitlab.com")]
    git_base_url: String,
    /// File holding the git token, or `-` for stdin; it goes into a Secret (never argv).
    #[arg(long)]
    git_token_file: Option<PathBuf>,
    /// File holding a webhook secret, or `-` for stdin: turns on the push webhooks
    /// (`/hooks/gitlab`, `/hooks/github`, `/hooks/generic` on the Service's port `webhook`,
    /// 9292).
    #[arg(long)]
    webhook_secret_file: Option<PathBuf>,
    /// A `kubernetes.io/dockerconfigjson` Secret in the agent's namespace (e.g. `kubectl
    /// create secret docker-registry`) with the credentials of the registries `oci://`
    /// sources and plugin modules come from: mounted and passed as --registry-config.
    #[arg(long)]
    registry_secret: Option<String>,
    /// Container image.
    #[arg(long, default_value_t = sluice::install::default_image())]
    image: String,
    /// Replicas sharing the projects (each project synced by one of them at a time).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// `cluster-admin` (as agentk's install), or `namespaced`: only what syncing into
    /// --namespace needs.
    #[arg(long, value_enum, default_value_t = RbacMode::ClusterAdmin)]
    rbac: RbacMode,
    /// With `--rbac namespaced`: the namespaces the agent may sync into (comma-separated).
    #[arg(long, value_delimiter = ',')]
    namespace: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RbacMode {
    ClusterAdmin,
    Namespaced,
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Show a plugin's world, exports, imports, WIT version, size and compile time; of a
    /// module in a registry (`oci://host/repo:tag[@sha256:…]`) also its digest and
    /// annotations. Nothing is run.
    Inspect {
        /// The component (.wasm), or an OCI reference.
        module: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Yaml)]
        output: Output,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Publish a module to a registry as `oci://host/repo:tag` (the Wasm OCI artifact
    /// layout, annotated with its world, WIT version and imports); prints its digest, the
    /// one to pin in `module: oci://host/repo:tag@sha256:…`.
    Push {
        /// The component (.wasm).
        file: PathBuf,
        /// `oci://host/repository:tag`.
        reference: String,
        /// Where the module was built from (`org.opencontainers.image.source`).
        #[arg(long)]
        source: Option<String>,
        /// The revision it was built from (`org.opencontainers.image.revision`).
        #[arg(long)]
        revision: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Write a plugin project that builds (`./build.sh`) and passes its own test (`sluice
    /// plugin test plugin-test.yaml`), started from the no-latest-tag example in LANG.
    New {
        /// The plugin's name (a lower-case DNS label): its rule id, crate or module name.
        name: String,
        /// The language.
        #[arg(long, value_enum)]
        lang: sluice::scaffold::Lang,
        /// Where to write it (default: ./NAME); must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run plugins on fixtures and compare their findings and output with what the
    /// fixtures expect, without a cluster: Gatekeeper `Suite` files (as `gator verify`
    /// runs them) and sluice `PluginTest` files. Exit 0 when every case passes, 1 when one
    /// fails, 2 when the tests cannot be run.
    Test {
        /// Test files, or directories to search for them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The gatekeeper plugin's module, which runs Suites.
        #[arg(long, env = "SLUICE_GATEKEEPER_MODULE")]
        gatekeeper: Option<PathBuf>,
        /// Print every case's result as JSON instead of the failures and a summary.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
}

/// How the plugin commands reach a registry.
#[derive(Debug, Args)]
struct RegistryArgs {
    /// `USER:PASSWORD` (else the Docker config's entry for the registry).
    #[arg(long, env = "SLUICE_REGISTRY_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// A Docker `config.json` (default: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`).
    #[arg(long, env = "SLUICE_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// An extra CA (PEM) to trust for the registry.
    #[arg(long)]
    registry_ca: Option<PathBuf>,
    /// Speak plain HTTP to the registry.
    #[arg(long)]
    insecure_registry: bool,
}

impl RegistryArgs {
    /// A source for `repository` (`oci://host/repo`) with these settings, caching under a
    /// temporary directory.
    fn source(&self, repository: &str, cache: &std::path::Path) -> Result<Source, String> {
        let credentials = match &self.creds {
            Some(c) => {
                let (u, p) = c.split_once(':').ok_or("--creds takes USER:PASSWORD")?;
                Some(Credentials {
                    username: u.into(),
                    password: p.into(),
                })
            }
            None => None,
        };
        let mut source = Source::new(repository, cache, credentials);
        if let Some(path) = &self.registry_ca {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            source = source.with_ca(pem);
        }
        if self.insecure_registry {
            source = source.with_plain_http();
        }
        let docker = self.registry_config.clone().or_else(|| {
            let dir = std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
            Some(dir.join("config.json"))
        });
        Ok(match docker {
            Some(path) => source.with_registry_config(path),
            None => source,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Yaml,
    Json,
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// Directory of manifests.
    #[arg(required_unless_present = "repo", conflicts_with = "repo")]
    dir: Option<PathBuf>,
    /// Repository URL instead of a directory.
    #[arg(long)]
    repo: Option<String>,
    /// Branch or commit of --repo (default branch).
    #[arg(long = "ref", requires = "repo")]
    git_ref: Option<String>,
    /// Agent configuration: paths, default namespace and plugins of a manifest project.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Which manifest project of --config (default: the first).
    #[arg(long)]
    project: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Yaml)]
    output: Output,
    /// age key file (`AGE-SECRET-KEY-1...` lines) for SOPS-encrypted files, as `sops`
    /// reads it.
    #[arg(long, env = "SOPS_AGE_KEY_FILE")]
    age_key_file: Option<PathBuf>,
    /// Print decrypted Secret values (masked by default).
    #[arg(long)]
    show_secrets: bool,
}

impl RenderArgs {
    /// Where the manifests come from: DIR, or --repo at --ref.
    fn input(&self) -> sluice::render::Input {
        match (&self.dir, &self.repo) {
            (Some(d), _) => sluice::render::Input::Dir(d.clone()),
            (None, Some(r)) => sluice::render::Input::Repo(r.clone(), self.git_ref.clone()),
            (None, None) => unreachable!("clap requires DIR or --repo"),
        }
    }
}

/// The age keys of `--age-key-file`, or exit code 2.
fn age_keys(
    file: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<sluice_agent::sops::Keys>>, ExitCode> {
    let Some(file) = file else { return Ok(None) };
    let text = std::fs::read(file).map_err(|e| {
        eprintln!("error: failed to read {}: {e}", file.display());
        ExitCode::from(2)
    })?;
    let name = file.display().to_string();
    sluice_agent::sops::Keys::parse([(name.as_str(), text.as_slice())])
        .map(|k| Some(std::sync::Arc::new(k)))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(2)
        })
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Agent configuration file (agentk's config.yaml).
    #[arg(
        long,
        conflicts_with = "config_repo",
        required_unless_present = "config_repo"
    )]
    config: Option<PathBuf>,
    /// Configuration repository: `.gitlab/agents/<agent-name>/sluice.yaml` (else agentk's
    /// `config.yaml` beside it) is read from its default branch and followed.
    #[arg(long, requires = "agent_name")]
    config_repo: Option<String>,
    /// Agent name: the configuration path and the default inventory id prefix.
    #[arg(long, default_value = "sluice")]
    agent_name: String,
    /// Base URL that project paths (`gitops.manifest_projects[].id`) resolve against.
    #[arg(
        long,
        env = "SLUICE_GIT_BASE_URL",
        default_value = "https://gitlab.com"
    )]
    git_base_url: String,
    /// Project path of the configuration project: the manifest project of entries without
    /// `id` (GitLab 15.7+). Default: the path of --config-repo.
    #[arg(long, default_value = "")]
    config_project: String,
    /// File holding the git token for the host of --git-base-url (never logged).
    #[arg(long, env = "SLUICE_GIT_TOKEN_FILE")]
    git_token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for https git servers, e.g. a self-hosted GitLab.
    #[arg(long, env = "SLUICE_GIT_CA_FILE")]
    git_ca_file: Option<PathBuf>,
    /// User name sent with the token.
    #[arg(long, default_value = "oauth2")]
    git_username: String,
    /// Registry credentials for `oci://` sources: a Docker `config.json`, e.g. the
    /// `.dockerconfigjson` of the Secret image pulls use (read at every request).
    #[arg(long, env = "SLUICE_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// An extra CA (PEM) trusted for one registry: `HOST=FILE` (repeatable). Registries
    /// without one trust the system's roots and --git-ca-file.
    #[arg(long = "registry-ca", value_name = "HOST=FILE")]
    registry_ca: Vec<String>,
    /// A registry spoken to over plain HTTP (repeatable); every other one is https only.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// Ref poll interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Interval of the full re-apply (every object dry-run, changed ones applied): the
    /// safety net behind the watches, which restore drift within seconds.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    reapply_interval: Duration,
    /// Server-side apply field manager.
    #[arg(long, default_value = "sluice")]
    field_manager: String,
    /// Concurrent applies within a stage.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Inventory id for a project, `PROJECT=ID`, to take over an agentk inventory
    /// (`inventory-<agentId>-<projectId>`). Repeatable.
    #[arg(long = "inventory-id", value_parser = parse_pair)]
    inventory_ids: Vec<(String, String)>,
    /// agentk's numeric agent id: only this agent's inventories (`inventory-<id>-<project
    /// id>`) are adopted. Without it, the agentk inventory that owns a project's live
    /// objects is found by its contents.
    #[arg(long)]
    agentk_agent_id: Option<String>,
    /// Never adopt agentk inventories.
    #[arg(long)]
    no_agentk_takeover: bool,
    /// Field managers whose ownership of applied fields is removed, so fields removed from
    /// git are removed from the cluster after a takeover. Repeatable.
    #[arg(long = "cleanup-field-manager", default_values_t = ["agentk".to_string()])]
    cleanup_field_managers: Vec<String>,
    /// Maximum number of manifest files per project and commit.
    #[arg(long, default_value_t = 1000)]
    max_files: usize,
    /// Maximum size of one manifest file, in bytes.
    #[arg(long, default_value_t = 5 << 20)]
    max_file_bytes: u64,
    /// Maximum total size of a project's manifest files, in bytes.
    #[arg(long, default_value_t = 20 << 20)]
    max_total_bytes: u64,
    /// Allow pruning every object when no file is selected.
    #[arg(long)]
    allow_empty_prune: bool,
    /// Git cache directory.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Namespace of the shard Lease; set (as agentk's POD_NAMESPACE) to run as one of
    /// several replicas that share the projects (each project synced by exactly one).
    /// Unset: this process syncs every project, with no Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// This replica's identity in the Lease (agentk: POD_NAME; default: the host name).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// The shard Lease (default `sluice-<agent-name>-shards`, never one of agentk's, which
    /// keeps its own leader election when it runs beside sluice).
    #[arg(long)]
    lease_name: Option<String>,
    /// Syncs that run at once across all projects (Flux's `--concurrent`); the others wait
    /// for a slot. Pushes and polls never wait for one.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_syncs: u16,
    /// Watch the synced objects one namespace at a time, never a resource in every
    /// namespace at once (which it does past 4 namespaces of one resource): for an agent
    /// whose RBAC lists only the namespaces it syncs into (`generate --rbac namespaced`).
    #[arg(long)]
    per_namespace_watches: bool,
    /// A single-leader Lease to wait for: while a live holder has it, this replica takes no
    /// shard (default `sluice-<agent-name>-lock`, sluice 0.4's; agentk's
    /// `agent-<agent id>-lock` when replacing agentk in place).
    #[arg(long)]
    wait_for_lease: Option<String>,
    /// Shards of a new shard table (projects are spread over them by a hash of their id);
    /// an existing table keeps its count. The most replicas that get work.
    #[arg(long, default_value_t = sluice_agent::shards::DEFAULT_SHARDS, value_parser = clap::value_parser!(u16).range(1..=1024))]
    shards: u16,
    /// Address of /metrics, /liveness and /readiness (agentk's flag and default).
    #[arg(long, default_value = "0.0.0.0:8080")]
    observability_listen_address: String,
    /// Address of the webhook receivers (`/hooks/*`), a port of their own (Flux's receiver
    /// port), served only with `--webhook-secret-file`.
    #[arg(long, default_value = "0.0.0.0:9292")]
    webhook_listen_address: String,
    /// File holding the webhook secret: turns on `POST /hooks/gitlab` (the secret is the
    /// webhook's "Secret token"), `/hooks/github` (its HMAC secret) and `/hooks/generic`
    /// (`Authorization: Bearer <secret>`); a valid push syncs its project at once.
    #[arg(long, env = "SLUICE_WEBHOOK_SECRET_FILE")]
    webhook_secret_file: Option<PathBuf>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .ok_or_else(|| format!("expected PROJECT=ID, got {s:?}"))
}

/// Flags of agentk's command line (its Helm chart passes `--token-file` and `--kas-address`
/// and no subcommand).
const AGENTK_FLAGS: &[&str] = &[
    "--token-file",
    "--kas-address",
    "--kas-ca-cert-file",
    "--kas-header",
    "--kas-insecure-skip-tls-verify",
    "--kas-tls-server-name",
];

/// The agentk flags in `args` (without the program name) when they start without a sluice
/// subcommand: the image of agentk's chart was swapped for sluice's, args unchanged.
fn agentk_invocation(args: &[String]) -> Vec<&str> {
    if args.first().is_none_or(|a| !a.starts_with('-')) {
        return Vec::new();
    }
    args.iter()
        .filter_map(|a| {
            let flag = a.split('=').next().unwrap_or(a);
            AGENTK_FLAGS.iter().copied().find(|f| *f == flag)
        })
        .collect()
}

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` asks
/// for them. mimalloc advises the kernel to back its arenas with 2 MiB pages, and a huge
/// page is resident as a whole however little of it is in use: at 10,000 objects the
/// agent's peak RSS was 98.2 MiB with them and 80.2 MiB without, for the same CPU time
/// (docs/performance.md); an agent with one Deployment, 49 against 31 MiB.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Only fails on kernels before 3.15, which then keep their default.
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

/// mimalloc's `mi_option_purge_delay`: its position in `mi_option_e`, the same in mimalloc
/// v2 and v3 (v3 is what libmimalloc-sys 0.1.49 builds).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system at once instead of after mimalloc v3's default
/// 1,000 ms (which, at the agent's pace of allocation, kept much of it resident: `sluice run` at
/// 2,000 objects peaked at 73 MiB with the default and 46.5 MiB with 0). The binary's
/// default, not the image's: `MIMALLOC_PURGE_DELAY` still wins when set.
fn purge_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc's options may be set at any time and
        // take no pointer.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

fn main() -> ExitCode {
    purge_at_once();
    no_huge_pages();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let agentk = agentk_invocation(&args);
    if !agentk.is_empty() {
        eprintln!(
            "error: sluice was started with agentk's command line ({}). sluice does not connect to GitLab's KAS: it reads its configuration and manifests from git itself.\n\
             Change the container's args (in agentk's Helm chart: replace the chart, or override its args) to, for example:\n\
             \x20 run --config-repo=https://gitlab.example.com/GROUP/AGENT-CONFIG-PROJECT.git --agent-name=AGENT-NAME --git-base-url=https://gitlab.example.com --git-token-file=/etc/sluice/git/token\n\
             The agent token of --token-file cannot read repositories: give sluice a project or group access token with read_repository.\n\
             `sluice generate` prints complete install manifests; docs/migrating-from-agentk.md has the steps.",
            agentk.join(", ")
        );
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    sluice_engine::install_crypto_provider();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run(args) => rt.block_on(run(*args)),
        Command::Sync(args) => rt.block_on(sync_once(*args)),
        Command::Render(args) => rt.block_on(render(args, false)),
        Command::Validate(args) => rt.block_on(render(args, true)),
        Command::Diff { args, inventory_id } => rt.block_on(diff(args, &inventory_id)),
        Command::Status {
            project,
            namespace,
            output,
        } => rt.block_on(status(project.as_deref(), namespace.as_deref(), output)),
        Command::Generate(args) => generate(args),
        Command::Plugin(PluginCommand::Inspect {
            module,
            output,
            registry,
        }) => inspect(&module, output, &registry),
        Command::Plugin(PluginCommand::Push {
            file,
            reference,
            source,
            revision,
            registry,
        }) => rt.block_on(push_plugin(&file, &reference, source, revision, &registry)),
        Command::Renderers(RenderersCommand::Compile { dir }) => compile_renderers(dir),
        Command::Plugin(PluginCommand::New { name, lang, dir }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            match sluice::scaffold::write(&dir, &name, lang) {
                Ok(files) => {
                    for f in files {
                        println!("{}", dir.join(f).display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Plugin(PluginCommand::Test {
            paths,
            gatekeeper,
            output,
        }) => plugin_test(&paths, gatekeeper, output),
    }
}

/// `plugin test`: the failures, each with its file, then a summary line (or every result
/// as JSON/YAML with `-o`).
fn plugin_test(paths: &[PathBuf], gatekeeper: Option<PathBuf>, output: Option<Output>) -> ExitCode {
    let opts = sluice::plugin_test::Options { gatekeeper };
    let results = match sluice::plugin_test::run(paths, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let count = |r: &str| results.iter().filter(|c| c.result == r).count();
    let (passed, failed, skipped) = (count("pass"), count("fail"), count("skip"));
    match output {
        Some(Output::Json) => println!(
            "{}",
            serde_json::to_string_pretty(&results).unwrap_or_default()
        ),
        Some(Output::Yaml) => print!("{}", serde_saphyr::to_string(&results).unwrap_or_default()),
        None => {
            for r in results.iter().filter(|c| c.result == "fail") {
                let at = [r.test.as_str(), r.case.as_str()]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join("/");
                println!(
                    "FAIL {} {at}: {}",
                    r.file,
                    r.message.as_deref().unwrap_or_default()
                );
            }
            let files: std::collections::BTreeSet<&str> =
                results.iter().map(|r| r.file.as_str()).collect();
            println!(
                "{} in {} files: {passed} passed, {failed} failed, {skipped} skipped",
                if failed == 0 { "ok" } else { "FAIL" },
                files.len()
            );
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `renderers compile`: exit 0 when every renderer is compiled (or already was), 1 when
/// one is missing or does not compile.
fn compile_renderers(dir: Option<PathBuf>) -> ExitCode {
    let renderers = match sluice_wasm::renderer::Renderers::new(dir, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match renderers.compile_all() {
        Ok(done) => {
            for (renderer, took) in done {
                println!("{renderer}: ready in {:.1} s", took.as_secs_f64());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `generate`: exit 0 with the manifests on stdout, 2 on bad flags or unreadable files.
fn generate(args: GenerateArgs) -> ExitCode {
    use sluice::install::{ConfigFrom, Params, Rbac};
    use std::io::Read;
    let fail = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(2)
    };
    let is_stdin = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str() == "-");
    if is_stdin(&args.git_token_file) && is_stdin(&args.webhook_secret_file) {
        return fail("only one of --git-token-file and --webhook-secret-file can be `-`".into());
    }
    // A secret from a file or stdin; never empty.
    let read = |path: &Option<PathBuf>, what: &str| -> Result<Option<String>, String> {
        let text = match path {
            Some(path) if path.as_os_str() == "-" => {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| format!("failed to read the {what} from stdin: {e}"))?;
                text
            }
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("failed to read {}: {e}", path.display()))?,
            None => return Ok(None),
        };
        if text.trim().is_empty() {
            return Err(format!("the {what} is empty"));
        }
        Ok(Some(text))
    };
    let git_token = match read(&args.git_token_file, "git token") {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let webhook_secret = match read(&args.webhook_secret_file, "webhook secret") {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let config = match (&args.config_repo, &args.config) {
        (Some(url), _) => ConfigFrom::Repo(url.clone()),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => ConfigFrom::File(text),
            Err(e) => return fail(format!("failed to read {}: {e}", path.display())),
        },
        (None, None) => unreachable!("clap requires --config-repo or --config"),
    };
    let rbac = match args.rbac {
        RbacMode::ClusterAdmin if !args.namespace.is_empty() => {
            return fail("--namespace needs --rbac namespaced".into());
        }
        RbacMode::ClusterAdmin => Rbac::ClusterAdmin,
        RbacMode::Namespaced => Rbac::Namespaced(args.namespace.clone()),
    };
    let params = Params {
        agent_name: args.agent_name,
        namespace: args.agent_namespace,
        image: args.image,
        replicas: args.replicas,
        rbac,
        config,
        git_base_url: args.git_base_url,
        git_token,
        webhook_secret,
        registry_secret: args.registry_secret,
    };
    match sluice::install::manifests(&params) {
        Ok(objects) => {
            print!("{}", sluice::install::to_yaml(&objects));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}

/// `status`: 0 when the state could be read, 1 when PROJECT has no inventory, 2 on errors.
async fn status(
    project: Option<&str>,
    namespace: Option<&str>,
    output: Option<Output>,
) -> ExitCode {
    let client = match kube_client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let cluster = match sluice_engine::cluster::Cluster::connect(client).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let projects = match sluice::status::collect(&cluster, namespace, project).await {
        Ok(p) => p,
        Err(e @ sluice::status::Error::NotFound(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    match (output, project) {
        (Some(Output::Json), _) => println!(
            "{}",
            serde_json::to_string_pretty(&projects).unwrap_or_default()
        ),
        (Some(Output::Yaml), _) => {
            print!("{}", serde_saphyr::to_string(&projects).unwrap_or_default())
        }
        (None, Some(_)) => {
            for p in &projects {
                print!("{}", sluice::status::detail(p, now));
            }
        }
        (None, None) if projects.is_empty() => eprintln!("no sluice inventories found"),
        (None, None) => print!("{}", sluice::status::table(&projects, now)),
    }
    ExitCode::SUCCESS
}

/// `render` and `validate`. Exit codes: 0 fine, 1 the commit would be refused (bad input
/// or error findings), 2 the command itself failed.
async fn render(args: RenderArgs, validate: bool) -> ExitCode {
    let input = args.input();
    let keys = match age_keys(args.age_key_file.as_deref()) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let result = sluice::render::render(
        &input,
        args.config.as_deref(),
        args.project.as_deref(),
        keys.as_ref(),
    )
    .await;
    match result {
        Ok(r) => {
            if validate {
                for f in &r.findings {
                    println!("{f}");
                }
                if r.findings.iter().any(|f| f.severity == "error") {
                    // Audit-mode errors: reported, not blocking (the cluster would apply).
                    eprintln!("{} findings (audit mode: not blocking)", r.findings.len());
                }
                eprintln!("{} objects valid", r.objects.len());
                return ExitCode::SUCCESS;
            }
            let values: Vec<serde_json::Value> = if args.show_secrets {
                r.objects.iter().map(|o| o.value()).collect()
            } else {
                sluice::render::mask_decrypted(&r.objects, keys.is_some())
            };
            match args.output {
                Output::Json => {
                    let list =
                        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values});
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                }
                Output::Yaml => {
                    for v in values {
                        println!("---");
                        print!("{}", serde_saphyr::to_string(&v).unwrap_or_default());
                    }
                }
            }
            for f in &r.findings {
                eprintln!("{f}");
            }
            ExitCode::SUCCESS
        }
        Err(sluice_agent::sync::Error::Plugin(sluice_wasm::Error::Denied(findings))) => {
            for f in &findings {
                println!("{f}");
            }
            eprintln!(
                "{} error findings: the commit would be refused",
                findings.len()
            );
            ExitCode::from(1)
        }
        // A plugin configuration the plugin rejects is bad input, like a bad manifest.
        Err(e @ sluice_agent::sync::Error::Plugin(sluice_wasm::Error::Config { .. })) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) if e.is_user_error() => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// A client from KUBECONFIG or the in-cluster configuration; exit code 2 when there is none.
async fn kube_client() -> Result<kube::Client, ExitCode> {
    sluice_engine::kube_client().await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// `diff`: kubectl's exit codes (0 no change, 1 changes, >1 error).
async fn diff(args: RenderArgs, inventory_id: &str) -> ExitCode {
    let input = args.input();
    let keys = match age_keys(args.age_key_file.as_deref()) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let client = match kube_client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match sluice::render::diff(
        &input,
        args.config.as_deref(),
        args.project.as_deref(),
        inventory_id,
        client,
        keys.as_ref(),
    )
    .await
    {
        Ok(changes) if changes.is_empty() => ExitCode::SUCCESS,
        Ok(changes) => {
            for c in &changes {
                let text = similar::TextDiff::from_lines(&c.live, &c.desired);
                print!(
                    "{}",
                    text.unified_diff().header(
                        &format!("live/{}", c.obj),
                        &format!("git/{} ({})", c.obj, c.origin)
                    )
                );
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn inspect(module: &str, output: Output, registry: &RegistryArgs) -> ExitCode {
    let file = module;
    let (bytes, pulled) = if module.starts_with("oci://") {
        let pulled = sluice_agent::oci::ModuleRef::parse(module).and_then(|r| {
            let cache = tempfile::tempdir().map_err(|e| e.to_string())?;
            let source = registry.source(&r.repository, cache.path())?;
            sluice_agent::oci::pull_module(&source, &r)
        });
        match pulled {
            Ok(m) => (m.bytes.clone(), Some(m)),
            Err(e) => {
                eprintln!("error: {module}: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        match std::fs::read(module) {
            Ok(b) => (b, None),
            Err(e) => {
                eprintln!("error: failed to read {module}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let info = sluice_wasm::Runtime::for_cli()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.inspect(&bytes).map_err(|e| e.to_string()));
    match info {
        Ok(info) => {
            let mut value = serde_json::to_value(&info).unwrap_or_default();
            if let (Some(m), Some(obj)) = (&pulled, value.as_object_mut()) {
                obj.insert("digest".into(), m.digest.clone().into());
                obj.insert(
                    "annotations".into(),
                    serde_json::to_value(&m.annotations).unwrap_or_default(),
                );
            }
            let text = match output {
                Output::Json => serde_json::to_string_pretty(&value).unwrap_or_default(),
                Output::Yaml => serde_saphyr::to_string(&value).unwrap_or_default(),
            };
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {file}: {e}");
            ExitCode::from(1)
        }
    }
}

/// `plugin push`: exit 0 and the digest on stdout, 1 when the module is not a plugin, 2
/// when the registry refuses.
async fn push_plugin(
    file: &std::path::Path,
    reference: &str,
    source: Option<String>,
    revision: Option<String>,
    registry: &RegistryArgs,
) -> ExitCode {
    use sluice_agent::oci;
    let fail = |code: u8, e: String| {
        eprintln!("error: {e}");
        ExitCode::from(code)
    };
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return fail(2, format!("failed to read {}: {e}", file.display())),
    };
    let r = match oci::ModuleRef::parse(reference) {
        Ok(oci::ModuleRef {
            tag: Some(tag),
            digest: None,
            repository,
        }) => (repository, tag),
        Ok(_) => {
            return fail(
                2,
                format!("{reference}: push to a tag (oci://host/repo:tag)"),
            );
        }
        Err(e) => return fail(2, e),
    };
    // What it is, checked before anything leaves the machine.
    let info = match sluice_wasm::Runtime::for_cli()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.inspect(&bytes).map_err(|e| e.to_string()))
    {
        Ok(i) => i,
        Err(e) => return fail(1, format!("{}: not a plugin: {e}", file.display())),
    };
    let world = serde_json::to_value(info.world)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut annotations = std::collections::BTreeMap::from([
        (oci::ANNOTATION_WORLD.to_string(), world.clone()),
        (oci::ANNOTATION_WIT.to_string(), info.wit_version.clone()),
        (oci::ANNOTATION_IMPORTS.to_string(), info.imports.join(",")),
        (
            "org.opencontainers.image.created".to_string(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ),
    ]);
    if let Some(s) = source {
        annotations.insert(oci::SOURCE.to_string(), s);
    }
    if let Some(r) = revision {
        annotations.insert(oci::REVISION.to_string(), r);
    }
    let os = if world == "function" {
        "wasip1"
    } else {
        "wasip2"
    };
    let cache = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return fail(2, e.to_string()),
    };
    let source = match registry.source(&r.0, cache.path()) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    match oci::push_module(&source, &r.1, bytes, os, annotations).await {
        Ok(digest) => {
            println!("{digest}");
            eprintln!("pushed {}:{}@{digest}", r.0, r.1);
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, format!("{reference}: {e}")),
    }
}

/// What `run` and `sync` share: the client, the configuration source and the options.
struct Setup {
    client: kube::Client,
    source: ConfigSource,
    opts: agent::Options,
    metrics: std::sync::Arc<sluice_agent::observability::Metrics>,
}

async fn setup(args: &RunArgs) -> Result<Setup, ExitCode> {
    let mut credentials = HashMap::new();
    if let Some(path) = &args.git_token_file {
        match std::fs::read_to_string(path) {
            Ok(token) => {
                let host = args
                    .git_base_url
                    .split("://")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                    .unwrap_or_default();
                credentials.insert(
                    host.to_string(),
                    Credentials {
                        username: args.git_username.clone(),
                        password: token.trim().to_string(),
                    },
                );
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "failed to read the git token file");
                return Err(ExitCode::from(2));
            }
        }
    }
    let git_ca = match &args.git_ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "failed to read the git CA file");
                return Err(ExitCode::from(2));
            }
        },
        None => None,
    };
    let mut registries = sluice_agent::oci::Registries {
        config_file: args.registry_config.clone(),
        plain_http: args.insecure_registry.iter().cloned().collect(),
        ..Default::default()
    };
    for entry in &args.registry_ca {
        let Some((host, path)) = entry.split_once('=') else {
            tracing::error!(value = %entry, "--registry-ca takes HOST=FILE");
            return Err(ExitCode::from(2));
        };
        match std::fs::read(path) {
            Ok(pem) => {
                registries.ca.insert(host.to_string(), pem);
            }
            Err(e) => {
                tracing::error!(path, error = %e, "failed to read the registry CA file");
                return Err(ExitCode::from(2));
            }
        }
    }
    let client = match sluice_engine::kube_client().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "failed to configure the Kubernetes client");
            return Err(ExitCode::from(2));
        }
    };
    let source = match (&args.config, &args.config_repo) {
        (Some(path), _) => ConfigSource::File(path.clone()),
        (None, Some(url)) => ConfigSource::Repo { url: url.clone() },
        (None, None) => unreachable!("clap requires one of --config, --config-repo"),
    };
    // Entries without `id` name the configuration project (agentk, GitLab 15.7+).
    let config_project = match (&args.config_project, &args.config_repo) {
        (p, _) if !p.is_empty() => p.clone(),
        (_, Some(url)) => sluice_agent::config::project_path(url),
        _ => String::new(),
    };
    let metrics = std::sync::Arc::new(sluice_agent::observability::Metrics::default());
    let cache_root = args
        .cache_dir
        .clone()
        .unwrap_or_else(sluice_model::default_cache_dir);
    let opts = agent::Options {
        agent_name: args.agent_name.clone(),
        git_base_url: args.git_base_url.clone(),
        config_project,
        credentials,
        poll_interval: args.poll_interval,
        reapply_interval: args.reapply_interval,
        cache_dir: cache_root.clone(),
        field_manager: args.field_manager.clone(),
        concurrency: args.concurrency,
        inventory_ids: args.inventory_ids.iter().cloned().collect(),
        takeover: if args.no_agentk_takeover {
            sluice_agent::sync::Takeover::Off
        } else {
            sluice_agent::sync::Takeover::Agentk {
                agent_id: args.agentk_agent_id.clone(),
            }
        },
        cleanup_managers: args.cleanup_field_managers.clone(),
        allow_empty_prune: args.allow_empty_prune,
        git_ca,
        registries,
        plugin_cache_dir: Some(cache_root.join("wasm")),
        // Modules load when a project first needs one: an agent that renders nothing
        // pays for an engine and nothing more.
        renderers: sluice_wasm::renderer::Renderers::new(None, Some(&cache_root.join("wasm")))
            .map_err(|e| tracing::warn!(error = %e, "renderers unavailable"))
            .ok()
            .map(std::sync::Arc::new),
        metrics: metrics.clone(),
        triggers: Default::default(),
        ownership: None,
        per_namespace_watches: args.per_namespace_watches,
        sync_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(usize::from(
            args.max_concurrent_syncs,
        ))),
        limits: sluice_agent::select::Limits {
            max_files: args.max_files,
            max_file_bytes: args.max_file_bytes,
            max_total_bytes: args.max_total_bytes,
        },
        protected: sluice_agent::limits::Protected {
            namespace: args.leader_election_namespace.clone(),
            lease: Some(
                args.lease_name
                    .clone()
                    .unwrap_or_else(|| sluice::install::shards_lease_name(&args.agent_name)),
            ),
            prefix: format!("sluice-{}", args.agent_name),
        },
    };
    Ok(Setup {
        client,
        source,
        opts,
        metrics,
    })
}

/// `sluice sync`: every project once, then a table like `flux get kustomizations`.
async fn sync_once(args: RunArgs) -> ExitCode {
    let _levels = report::init(args.log_format, sluice_agent::config::LogLevel::Info);
    let Setup {
        client,
        source,
        opts,
        ..
    } = match setup(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let outcomes = match agent::run_once(client, source, opts).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{:<40} {:<8} {:<12} SUMMARY", "PROJECT", "READY", "COMMIT");
    for o in &outcomes {
        match &o.result {
            Ok(r) => {
                let mut summary = report::summary(&r.results);
                if !r.prune_held.is_empty() {
                    summary.push_str(&format!(" (prune held: {})", r.prune_held.join("; ")));
                }
                println!(
                    "{:<40} {:<8} {:<12} {summary}",
                    o.project,
                    "True",
                    r.commit.get(..12).unwrap_or(&r.commit)
                );
            }
            Err(e) => println!("{:<40} {:<8} {:<12} {e}", o.project, "False", "-"),
        }
    }
    if outcomes.iter().all(|o| o.result.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(args: RunArgs) -> ExitCode {
    let levels = report::init(args.log_format, sluice_agent::config::LogLevel::Info);
    let Setup {
        client,
        source,
        opts,
        metrics,
    } = match setup(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let hooks = match &args.webhook_secret_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(secret) if !secret.trim().is_empty() => {
                Some(std::sync::Arc::new(sluice_agent::webhook::Receiver::new(
                    secret.trim().to_string().into(),
                    opts.triggers.clone(),
                    metrics.clone(),
                )))
            }
            Ok(_) => {
                tracing::error!(path = %path.display(), "the webhook secret file is empty");
                return ExitCode::from(2);
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "failed to read the webhook secret file");
                return ExitCode::from(2);
            }
        },
    };
    match tokio::net::TcpListener::bind(&args.observability_listen_address).await {
        Ok(listener) => {
            tokio::spawn(sluice_agent::observability::serve(
                listener,
                metrics.clone(),
            ));
        }
        Err(e) => {
            tracing::error!(address = %args.observability_listen_address, error = %e, "failed to listen for /metrics, /liveness and /readiness");
            return ExitCode::from(2);
        }
    }
    if let Some(receiver) = hooks {
        match tokio::net::TcpListener::bind(&args.webhook_listen_address).await {
            Ok(listener) => {
                tokio::spawn(sluice_agent::webhook::serve(listener, receiver));
            }
            Err(e) => {
                tracing::error!(address = %args.webhook_listen_address, error = %e, "failed to listen for the push webhooks");
                return ExitCode::from(2);
            }
        }
    }
    let Some(namespace) = args.leader_election_namespace.clone() else {
        return match agent::run(client, source, opts, Some(levels), shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "agent failed to start");
                ExitCode::from(1)
            }
        };
    };
    let identity = args
        .leader_election_identity
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| format!("sluice-{}", std::process::id()));
    let lease = args
        .lease_name
        .clone()
        .unwrap_or_else(|| sluice::install::shards_lease_name(&opts.agent_name));
    let cfg = sluice_agent::shards::Config {
        shards: args.shards,
        legacy_lock: Some(
            args.wait_for_lease
                .clone()
                .unwrap_or_else(|| sluice::install::lease_name(&opts.agent_name)),
        ),
        ..sluice_agent::shards::Config::new(&namespace, &lease, &identity)
    };
    // The Lease has a connection of its own: heartbeats never queue behind a sync's writes.
    let lease_client = match sluice_engine::kube_client().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "failed to build the shard lease's client");
            return ExitCode::from(2);
        }
    };
    let ownership = sluice_agent::shards::Ownership::new(&identity);
    let opts = agent::Options {
        ownership: Some(ownership.clone()),
        ..opts
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let shards = tokio::spawn(sluice_agent::shards::run(
        lease_client,
        cfg,
        ownership,
        until_stopped(stopped.clone()),
    ));
    match agent::run(client, source, opts, Some(levels), until_stopped(stopped)).await {
        Ok(()) => {
            // The agent stopped its workers; now give the shards up.
            let _ = shards.await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "agent failed to start");
            shards.abort();
            ExitCode::from(1)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or_default(),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_purge_delay_option_is_mimallocs_and_set_to_zero() {
        // mimalloc v3's documented default (1,000 ms) tells the option's position is right.
        #[allow(unsafe_code)]
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(
            before == 1000 || std::env::var_os("MIMALLOC_PURGE_DELAY").is_some(),
            "{before}"
        );
        purge_at_once();
        #[allow(unsafe_code)]
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(after, 0);
        }
    }

    #[test]
    fn agentk_chart_arguments_are_recognised() {
        assert_eq!(
            agentk_invocation(&args(&[
                "--token-file=/etc/agentk/secrets/token",
                "--kas-address",
                "wss://kas.gitlab.com"
            ])),
            ["--token-file", "--kas-address"]
        );
        // A sluice subcommand first: sluice's own flags, whatever follows.
        assert!(agentk_invocation(&args(&["run", "--token-file=x"])).is_empty());
        assert!(agentk_invocation(&args(&["--version"])).is_empty());
        assert!(agentk_invocation(&args(&[])).is_empty());
        Cli::command().debug_assert();
    }
}
