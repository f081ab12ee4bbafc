//! Loading end to end: sources and precedence, databases and IAM rules, users, errors, secrets.

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use super::*;

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(contents.as_bytes())
        .expect("write temp file");
    file
}

fn path(file: &tempfile::NamedTempFile) -> &str {
    file.path().to_str().expect("utf-8 temp path")
}

fn errors(args: &[&str], env: &[(&str, &str)]) -> Vec<ConfigError> {
    match Config::from_args(args, env) {
        Ok(config) => panic!("expected errors, got {config:?}"),
        Err(errors) => errors.0,
    }
}

fn one_error(args: &[&str], env: &[(&str, &str)]) -> ConfigError {
    let mut all = errors(args, env);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

const RDS_HOST: &str = "mydb.abc123xyz.us-east-1.rds.amazonaws.com";

#[test]
fn sidecar_needs_only_upstream_and_listen() {
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://app@db.internal/appdb",
            "--listen",
            "127.0.0.1:6432",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(config.listen, vec!["127.0.0.1:6432".parse().unwrap()]);
    let db = config.database("appdb").expect("named after the dbname");
    assert_eq!(db.pool_size, 10);
    assert_eq!(db.pool_mode, PoolMode::Transaction);
    assert_eq!(db.upstream.port, 5432);
    assert_eq!(db.upstream.sslmode, SslMode::Prefer);
    assert_eq!(db.upstream.auth, UpstreamAuth::Password);
    assert_eq!(db.upstream.max_new_connections_per_second, 50);
    assert_eq!(config.server_lifetime, Duration::from_secs(3600));
    assert_eq!(config.server_lifetime_jitter, Duration::from_secs(360));
    assert_eq!(config.idle_transaction_timeout, None);
    assert_eq!(config.max_message_size, 256 << 20);
    assert_eq!(config.client_tls, ClientTls::Disable);
    assert_eq!(config.auth_type, AuthType::ScramSha256);
    assert!(config.users.is_empty());
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let toml = file("pool_size = 5\nserver_idle_timeout = 100\n[databases.app]\nupstream = \"postgres://app@h/app\"\n");
    let cfg = path(&toml);
    let size = |args: &[&str], env: &[(&str, &str)]| {
        let config = Config::from_args(args, env).unwrap();
        config.databases[0].pool_size
    };
    let env = [("IAMPOOL_CONFIG", cfg), ("IAMPOOL_POOL_SIZE", "7")];
    assert_eq!(size(&["--pool-size", "9"], &env), 9);
    assert_eq!(size(&[], &env), 7);
    assert_eq!(size(&[], &env[..1]), 5);
    assert_eq!(size(&["--upstream", "postgres://x@h/x"], &[]), 10);

    let loaded = Config::load(
        ["iampool", "--config", cfg, "--pool-size", "9"],
        [(
            "IAMPOOL_SERVER_IDLE_TIMEOUT".to_string(),
            "5min".to_string(),
        )],
    )
    .unwrap();
    let config = loaded.config.as_ref().unwrap();
    assert_eq!(config.server_idle_timeout, Duration::from_secs(300));
    assert_eq!(
        loaded.sources["databases.app.pool_size"],
        Origin::Flag("--pool-size".into())
    );
    assert_eq!(
        loaded.sources["server_idle_timeout"],
        Origin::Env("IAMPOOL_SERVER_IDLE_TIMEOUT".into())
    );
    assert_eq!(
        loaded.sources["databases.app.upstream"],
        Origin::File(toml.path().into())
    );
    assert_eq!(loaded.sources["server_lifetime"], Origin::Default);
    assert_eq!(loaded.command, Command::Run);
}

#[test]
fn database_settings_beat_global_ones() {
    let toml = file(
        "pool_mode = \"session\"\n[databases.app]\nupstream = \"postgres://app@h/app?pool_mode=transaction\"\npool_size = 3\n",
    );
    let config = Config::from_args(&["--config", path(&toml), "--pool-size", "9"], &[]).unwrap();
    let db = config.database("app").unwrap();
    assert_eq!((db.pool_size, db.pool_mode), (3, PoolMode::Transaction));
}

#[test]
fn every_url_parameter() {
    let ca = file("not checked here");
    let url = format!(
        "postgres://u@{RDS_HOST}:5433/d?sslmode=verify-ca&sslrootcert={}&hostaddr=10.1.2.3&auth=iam\
         &region=eu-west-1&assume_role_arn=arn:aws:iam::111111111111:role/a,arn:aws:iam::222222222222:role/b\
         &external_id=ext&role_session_name=sess&token_lifetime=600&max_new_connections_per_second=5\
         &reauth_interval=1h&allow_cleartext_password=on&pool_size=4&min_pool_size=1&pool_mode=session&name=front",
        path(&ca)
    );
    let config = Config::from_args(&[], &[("IAMPOOL_UPSTREAM", &url)]).unwrap();
    let db = config.database("front").expect("named by ?name=");
    assert_eq!(
        (db.pool_size, db.min_pool_size, db.pool_mode),
        (4, 1, PoolMode::Session)
    );
    let u = &db.upstream;
    assert_eq!(
        (u.host.as_str(), u.port, u.user.as_str(), u.dbname.as_str()),
        (RDS_HOST, 5433, "u", "d")
    );
    assert_eq!(u.hostaddr, Some("10.1.2.3".parse::<IpAddr>().unwrap()));
    assert_eq!(u.sslmode, SslMode::VerifyCa);
    assert_eq!(u.sslrootcert.as_deref(), Some(ca.path()));
    assert_eq!(u.max_new_connections_per_second, 5);
    assert_eq!(u.reauth_interval, Some(Duration::from_secs(3600)));
    assert!(u.allow_cleartext_password);
    let UpstreamAuth::Iam(iam) = &u.auth else {
        panic!("auth=iam")
    };
    assert_eq!(iam.region, "eu-west-1");
    assert!(!iam.region_inferred);
    assert_eq!(iam.assume_role_arns.len(), 2);
    assert_eq!(iam.external_id.as_deref(), Some("ext"));
    assert_eq!(iam.role_session_name, "sess");
    assert_eq!(iam.token_lifetime, Duration::from_secs(600));
}

#[test]
fn url_parameter_mistakes() {
    let e = one_error(&["--upstream", "postgres://u@h/d?sslmdoe=require"], &[]);
    assert_eq!(e.key, "databases.d.sslmdoe");
    assert_eq!(e.source, "the URL in --upstream");
    assert!(
        e.message.contains("unknown URL parameter \"sslmdoe\""),
        "{e}"
    );
    assert_eq!(e.fix, "did you mean sslmode?");

    let e = one_error(
        &["--upstream", "postgres://u@h/d?hostaddr=db.internal"],
        &[],
    );
    assert_eq!(e.key, "databases.d.hostaddr");
    assert!(e.message.contains("is not an IP address"), "{e}");

    let e = one_error(&["--upstream", "postgres://u@h/d?password=hunter2"], &[]);
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn mistakes_are_reported_together_with_key_source_and_fix() {
    let toml = file("max_message_size = \"1TB\"\n");
    let all = errors(
        &[
            "--config",
            path(&toml),
            "--server-lifetime",
            "soon",
            "--upstream",
            "postgres://u@h/d",
        ],
        &[("IAMPOOL_POOL_SIZE", "ten")],
    );
    let lines: Vec<String> = all.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines.contains(
        &"pool_size (from IAMPOOL_POOL_SIZE): \"ten\" is not a number; set a whole number of server connections, e.g. 20".to_string()
    ));
    assert!(lines
        .iter()
        .any(|l| l
            .starts_with("server_lifetime (from --server-lifetime): \"soon\" is not a duration")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with(&format!("max_message_size (from {}): ", path(&toml)))));
}

#[test]
fn unknown_keys_are_rejected_with_suggestions() {
    let toml = file(
        "pool_sise = 3\nauth = \"iam\"\n[databases.app]\nupstream = \"postgres://u@h/d\"\nsslmod = \"require\"\n[users.bob]\npasword = \"x\"\n",
    );
    let all = errors(
        &["--config", path(&toml)],
        &[("IAMPOOL_POOL_SIZ", "3"), ("IAMPOOL_CONFIG", "ignored")],
    );
    let find = |key: &str| {
        all.iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("{key}: {all:#?}"))
    };
    assert_eq!(find("pool_sise").fix, "did you mean pool_size?");
    assert!(find("auth").fix.contains("?auth=iam"), "{all:#?}");
    assert_eq!(find("pool_siz").fix, "did you mean IAMPOOL_POOL_SIZE?");
    assert_eq!(find("pool_siz").source, "IAMPOOL_POOL_SIZ");
    assert_eq!(find("databases.app.sslmod").fix, "did you mean sslmode?");
    assert_eq!(find("users.bob.pasword").fix, "did you mean password?");
    assert_eq!(find("users.bob.password").message, "is missing");
    assert_eq!(all.len(), 6, "{all:#?}");
}

#[test]
fn iam_rules() {
    let config = Config::from_args(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/appdb?auth=iam"),
        ],
        &[],
    )
    .unwrap();
    let u = &config.databases[0].upstream;
    assert_eq!(u.sslmode, SslMode::VerifyFull);
    let UpstreamAuth::Iam(iam) = &u.auth else {
        panic!("iam")
    };
    assert_eq!(
        (iam.region.as_str(), iam.region_inferred),
        ("us-east-1", true)
    );
    assert_eq!(iam.token_lifetime, Duration::from_secs(900));
    assert_eq!(iam.role_session_name, "iampool");

    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode=prefer"),
        ],
        &[],
    );
    assert_eq!(e.key, "databases.d.sslmode");
    assert!(
        e.message
            .contains("the IAM token is sent as a cleartext password"),
        "{e}"
    );
    assert!(e.fix.starts_with("use sslmode=verify-full"), "{e}");

    // TLS that does not verify the server is refused too: the token would go to whoever
    // answers. Only the loudly named opt-out lets a test setup use it.
    for mode in ["require", "prefer", "allow"] {
        let url = format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode={mode}");
        let e = one_error(&["--upstream", &url], &[]);
        assert_eq!(e.key, "databases.d.sslmode", "{mode}");
        assert!(e.fix.contains("insecure_unverified_tls"), "{e}");
    }
    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode=require"),
        ],
        &[],
    );
    assert!(e.message.contains("does not verify the server"), "{e}");
    let config = Config::from_args(
        &[
            "--upstream",
            &format!(
                "postgres://app@{RDS_HOST}/d?auth=iam&sslmode=require&insecure_unverified_tls=true"
            ),
        ],
        &[],
    )
    .unwrap();
    let u = &config.databases[0].upstream;
    assert_eq!(
        (u.sslmode, u.insecure_unverified_tls),
        (SslMode::Require, true)
    );
    let e = one_error(
        &[
            "--upstream",
            &format!(
                "postgres://app@{RDS_HOST}/d?auth=iam&sslmode=prefer&insecure_unverified_tls=true"
            ),
        ],
        &[],
    );
    assert!(e.message.contains("too weak"), "{e}");
    for mode in ["verify-ca", "verify-full"] {
        let url = format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode={mode}");
        assert!(
            Config::from_args(&["--upstream", &url], &[]).is_ok(),
            "{mode}"
        );
    }

    let e = one_error(
        &["--upstream", "postgres://app@db.internal/d?auth=iam"],
        &[],
    );
    assert_eq!(e.key, "databases.d.region");
    assert!(e.fix.contains("region=us-east-1"), "{e}");
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://app@db.internal/d?auth=iam",
            "--region",
            "eu-west-1",
        ],
        &[],
    )
    .unwrap();
    assert!(
        matches!(&config.databases[0].upstream.auth, UpstreamAuth::Iam(iam) if iam.region == "eu-west-1")
    );

    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app:hunter2@{RDS_HOST}/d?auth=iam"),
        ],
        &[],
    );
    assert_eq!(e.key, "databases.d.password");
    assert!(
        e.message.contains("auth=iam") && !e.to_string().contains("hunter2"),
        "{e}"
    );
}

#[test]
fn range_and_cross_checks() {
    let up = "postgres://u@h/d";
    let e = one_error(
        &["--upstream", up, "--max-new-connections-per-second", "0"],
        &[],
    );
    assert_eq!(e.key, "max_new_connections_per_second");
    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://u@{RDS_HOST}/d?auth=iam&token_lifetime=20min"),
        ],
        &[],
    );
    assert_eq!(e.key, "databases.d.token_lifetime");
    let e = one_error(&["--upstream", up, "--max-message-size", "4kB"], &[]);
    assert_eq!(e.key, "max_message_size");
    let e = one_error(&["--upstream", up, "--min-pool-size", "20"], &[]);
    assert_eq!(
        (e.key.as_str(), e.source.as_str()),
        ("min_pool_size", "--min-pool-size")
    );
    assert!(e.message.contains("more than pool_size 10"), "{e}");
    let e = one_error(
        &[
            "--upstream",
            up,
            "--server-lifetime",
            "1min",
            "--server-lifetime-jitter",
            "2min",
        ],
        &[],
    );
    assert_eq!(e.key, "server_lifetime_jitter");
    let e = one_error(&["--upstream", up, "--log-level", "info,[[["], &[]);
    assert_eq!(e.key, "log_level");
    let e = one_error(&["--upstream", up, "--listen", "localhost:6432"], &[]);
    assert_eq!(e.key, "listen");
    let config = Config::from_args(
        &[
            "--upstream",
            up,
            "--listen",
            "127.0.0.1:1, [::1]:2",
            "--idle-transaction-timeout",
            "30s",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(config.listen.len(), 2);
    assert_eq!(
        config.idle_transaction_timeout,
        Some(Duration::from_secs(30))
    );
}

#[test]
fn no_database_is_an_error_naming_upstream() {
    let e = one_error(&[], &[]);
    assert_eq!(e.key, "upstream");
    assert!(e.fix.contains("--upstream postgres://"), "{e}");
    // Bad global defaults are still reported alongside.
    assert_eq!(errors(&[], &[("IAMPOOL_SSLMODE", "strict")]).len(), 2);
}

#[test]
fn several_upstream_urls_and_duplicate_names() {
    let env = [(
        "IAMPOOL_UPSTREAM",
        "postgres://a@h/one\n  postgres://b@h/two?name=second",
    )];
    let config = Config::from_args(&[], &env).unwrap();
    let names: Vec<&str> = config.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["one", "second"]);

    let toml = file("[databases.one]\nupstream = \"postgres://x@h/x\"\n");
    let e = one_error(
        &["--config", path(&toml), "--upstream", "postgres://a@h/one"],
        &[],
    );
    assert_eq!(e.key, "databases.one");
    assert!(e.message.contains("defined twice"), "{e}");
}

#[test]
fn client_tls_rules() {
    let (cert, key) = (file("cert"), file("key"));
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&["--upstream", "postgres://u@h/d"][..], extra].concat()
    }
    let config = Config::from_args(
        &with(&[
            "--client-tls-cert-file",
            path(&cert),
            "--client-tls-key-file",
            path(&key),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(config.client_tls, ClientTls::Allow);
    let e = one_error(&with(&["--client-tls", "require"]), &[]);
    assert_eq!(e.key, "client_tls");
    let e = one_error(&with(&["--client-tls-cert-file", path(&cert)]), &[]);
    assert_eq!(e.key, "client_tls_cert_file");
    let e = one_error(&with(&["--client-tls-key-file", "/no/such/file"]), &[]);
    assert!(e.message.contains("not an existing file"), "{e}");
}

#[test]
fn users_from_table_auth_file_and_urls() {
    let scram = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";
    let auth = file(&format!(
        "; users\n\"alice\" \"from-file\"\n\"carol\" \"{scram}\"\n\"app\" \"file-app\"\n"
    ));
    let toml = file(&format!(
        "auth_file = {:?}\n[users.alice]\npassword = \"from-table\"\n[databases.app]\nupstream = \"postgres://app:url-app@h/app\"\n[databases.rep]\nupstream = \"postgres://rep@h/rep\"\npassword = \"rep-pw\"\n",
        path(&auth)
    ));
    let loaded = Config::load(["iampool", "--config", path(&toml)], Vec::new()).unwrap();
    let users = &loaded.config.as_ref().unwrap().users;
    let plain = |name: &str| match &users[name] {
        UserSecret::Plain(secret) => secret.expose().to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(plain("alice"), "from-table");
    assert_eq!(plain("app"), "file-app");
    assert_eq!(plain("rep"), "rep-pw");
    assert!(matches!(&users["carol"], UserSecret::Scram(_)));
    assert_eq!(
        loaded.sources["users.carol"],
        Origin::AuthFile(auth.path().into())
    );
}

#[test]
fn auth_file_mistakes_name_the_line() {
    let auth = file("\"ok\" \"fine\"\nalice hunter2\n");
    let e = one_error(
        &["--upstream", "postgres://u@h/d", "--auth-file", path(&auth)],
        &[],
    );
    assert_eq!(e.key, "auth_file");
    assert_eq!(e.source, format!("{} line 2", path(&auth)));
    assert!(!e.to_string().contains("hunter2"));

    let md5 = file(&format!("\"bob\" \"md5{}\"\n", "0".repeat(32)));
    let e = one_error(
        &["--upstream", "postgres://u@h/d", "--auth-file", path(&md5)],
        &[],
    );
    assert_eq!(e.key, "auth_type");
    assert!(Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/d",
            "--auth-file",
            path(&md5),
            "--auth-type",
            "md5"
        ],
        &[]
    )
    .is_ok());
}

#[test]
fn secrets_never_show() {
    let auth = file("\"fileuser\" \"s3cret-file\"\n");
    let toml = file(&format!(
        "auth_file = {:?}\n[users.alice]\npassword = \"s3cret-table\"\n[databases.rep]\nupstream = \"postgres://rep@h/rep\"\npassword = \"s3cret-db\"\n",
        path(&auth)
    ));
    let args = [
        "iampool",
        "--config",
        path(&toml),
        "--upstream",
        "postgres://app:s3cret-url@h/app",
    ];
    let loaded = Config::load(args, Vec::new()).unwrap();
    let config = loaded.config.clone().unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{loaded:?}"),
        config.render_redacted(),
        loaded.render_redacted(),
    ] {
        assert!(!shown.contains("s3cret"), "{shown}");
    }
    assert!(loaded.render_redacted().contains("<redacted>"));

    // Errors elsewhere in the same configuration: still nothing secret.
    let mut bad: Vec<&str> = args[1..].to_vec();
    bad.extend([
        "--pool-size",
        "x",
        "--upstream",
        "postgres://app:s3cret-url@h/app?auth=iam&sslmdoe=1",
    ]);
    let all =
        Config::from_args(&bad, &[("IAMPOOL_UPSTREAM", "postgres://u:s3cret-env@")]).unwrap_err();
    assert!(all.0.len() >= 3, "{all}");
    assert!(
        !all.to_string().contains("s3cret") && !format!("{all:?}").contains("s3cret"),
        "{all}"
    );
    let toml = file("[users.x]\npassword = \"s3cret\" oops\n");
    let all = Config::from_args(&["--config", path(&toml)], &[]).unwrap_err();
    assert!(all.to_string().contains("line 2"), "{all}");
    assert!(!all.to_string().contains("s3cret"), "{all}");
}

#[test]
fn rendered_config_loads_back_to_the_same_config() {
    let toml = file(
        "listen = \"127.0.0.1:7000,[::1]:7001\"\nserver_lifetime = \"90min\"\nadmin_users = [\"admin\", \"ops\"]\nmax_message_size = 1048576\n\
         [databases.\"odd name\"]\nupstream = \"postgres://a%20b@[::1]:6000/x?hostaddr=::1\"\npool_size = 2\n\
         [databases.iam]\nupstream = \"postgres://app@db.internal/appdb?auth=iam&region=us-west-2\"\nassume_role_arn = \"arn:aws:iam::123456789012:role/x\"\nreauth_interval = \"12h\"\n",
    );
    let loaded = Config::load(
        ["iampool", "--config", path(&toml), "--log-level", "debug"],
        Vec::new(),
    )
    .unwrap();
    let rendered = loaded.render_redacted();
    assert!(
        rendered.contains(&format!("# {}", path(&toml))),
        "{rendered}"
    );
    assert!(rendered.contains("# --log-level"), "{rendered}");
    let again = file(&rendered);
    let mut reloaded = Config::from_args(&["--config", path(&again)], &[]).unwrap();
    // Everything but where it was read from.
    assert_eq!(reloaded.watched_files, [again.path()]);
    reloaded.watched_files = vec![toml.path().to_path_buf()];
    assert_eq!(Some(&reloaded), loaded.config.as_ref(), "{rendered}");
}

#[test]
fn changed_keys_for_reload() {
    let old = Config::from_args(&["--upstream", "postgres://u@h/d"], &[]).unwrap();
    let new = Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/e",
            "--pool-size",
            "3",
            "--listen",
            "0.0.0.0:1",
        ],
        &[],
    )
    .unwrap();
    let changed = old.changed_keys(&new);
    assert_eq!(changed, ["listen", "databases"]);
    let needs_restart: Vec<_> = changed
        .into_iter()
        .filter(|key| !is_reloadable(key))
        .collect();
    assert_eq!(needs_restart, ["listen"]);
}

#[test]
fn commands() {
    let loaded = Config::load(
        ["iampool", "check-config", "--upstream", "postgres://u@h/d"],
        Vec::new(),
    )
    .unwrap();
    assert_eq!(loaded.command, Command::CheckConfig);
    assert!(loaded.render_redacted().contains("[databases.d]"));

    let token = [
        "iampool",
        "token",
        "--host",
        RDS_HOST,
        "--port",
        "5433",
        "--user",
        "u",
        "--signing-time",
        "2024-01-02T03:04:05Z",
    ];
    let loaded = Config::load(token, Vec::new()).unwrap();
    assert!(loaded.config.is_none());
    let Command::Token(args) = loaded.command else {
        panic!("token")
    };
    assert_eq!(
        (args.port, args.signing_time.as_deref()),
        (5433, Some("2024-01-02T03:04:05Z"))
    );
    let bad = Config::load(
        [
            "iampool",
            "token",
            "--host",
            "h",
            "--user",
            "u",
            "--signing-time",
            "yesterday",
        ],
        Vec::new(),
    );
    assert_eq!(bad.unwrap_err().0[0].key, "signing_time");

    let e = Config::from_args(&["--pool-sise", "3"], &[]).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(e.0[0].fix.contains("--pool-size"), "{e}");
}

#[test]
fn example_file_is_a_working_configuration() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/iampool.example.toml");
    let config = Config::from_args(&["--config", example], &[]).unwrap();
    let db = config.database("app").unwrap();
    assert!(matches!(&db.upstream.auth, UpstreamAuth::Iam(iam) if iam.region_inferred));
}

#[test]
fn file_lists_are_arrays_or_strings() {
    let toml = file(
        "admin_users = [\"a\", \"b\"]\nstats_users = \"c, d\"\nupstream = [\"postgres://x@h/x\", \"postgres://y@h/y\"]\nlisten = [\"127.0.0.1:1\"]\n",
    );
    let config = Config::from_args(
        &["--config", path(&toml)],
        &[("IAMPOOL_ASSUME_ROLE_ARN", "")],
    )
    .unwrap();
    assert_eq!(config.admin_users, ["a", "b"]);
    assert_eq!(config.stats_users, ["c", "d"]);
    assert_eq!(config.databases.len(), 2);
    let e = one_error(
        &[
            "--config",
            path(&file(
                "admin_users = [1]\nupstream = \"postgres://x@h/x\"\n",
            )),
        ],
        &[],
    );
    assert_eq!(e.key, "admin_users");
}

#[test]
fn kubernetes_service_links_are_not_unknown_keys() {
    let env = [
        ("IAMPOOL_SERVICE_HOST", "10.0.0.1"),
        ("IAMPOOL_SERVICE_PORT", "6432"),
        ("IAMPOOL_SERVICE_PORT_PG", "6432"),
        ("IAMPOOL_PORT", "tcp://10.0.0.1:6432"),
        ("IAMPOOL_PORT_6432_TCP", "tcp://10.0.0.1:6432"),
        ("IAMPOOL_PORT_6432_TCP_PROTO", "tcp"),
        ("IAMPOOL_PORT_6432_TCP_PORT", "6432"),
        ("IAMPOOL_PORT_6432_TCP_ADDR", "10.0.0.1"),
        ("IAMPOOL_UPSTREAM", "postgres://u@h/d"),
    ];
    assert!(Config::from_args(&[], &env).is_ok());
    let e = one_error(
        &[],
        &[
            ("IAMPOOL_PORT", "6432"),
            ("IAMPOOL_UPSTREAM", "postgres://u@h/d"),
        ],
    );
    assert_eq!(e.source, "IAMPOOL_PORT");
}

#[test]
fn key_file_variables_read_the_value_from_a_file() {
    let url = file("postgres://app:s3cret@db.internal/app?sslmode=disable\n");
    let config = Config::from_args(&[], &[("IAMPOOL_UPSTREAM_FILE", path(&url))]).expect("loads");
    let upstream = &config.databases[0].upstream;
    assert_eq!(
        upstream.password.as_ref().map(Secret::expose),
        Some("s3cret"),
        "the line end is not part of the value"
    );
    assert_eq!(config.watched_files, [url.path()]);

    // IAMPOOL_AUTH_FILE is a key of its own (a path), not AUTH with _FILE.
    let users = file("\"bob\" \"pw\"\n");
    let config = Config::from_args(
        &["--upstream", "postgres://u@h/d"],
        &[("IAMPOOL_AUTH_FILE", path(&users))],
    )
    .expect("loads");
    assert!(config.users.contains_key("bob"));
    assert_eq!(config.watched_files, [users.path()]);
}

#[test]
fn key_file_variables_name_the_problem() {
    let url = file("postgres://app@db.internal/app");
    let both = errors(
        &[],
        &[
            ("IAMPOOL_UPSTREAM", "postgres://u@h/d"),
            ("IAMPOOL_UPSTREAM_FILE", path(&url)),
        ],
    );
    assert_eq!(both.len(), 1, "{both:#?}");
    assert_eq!(both[0].source, "IAMPOOL_UPSTREAM_FILE");
    assert_eq!(
        both[0].message,
        "both IAMPOOL_UPSTREAM_FILE and IAMPOOL_UPSTREAM are set"
    );

    let missing = errors(
        &[],
        &[("IAMPOOL_UPSTREAM_FILE", "/nonexistent/iampool/upstream")],
    );
    let e = missing
        .iter()
        .find(|e| e.source == "IAMPOOL_UPSTREAM_FILE")
        .unwrap_or_else(|| panic!("{missing:#?}"));
    assert!(
        e.message
            .starts_with("cannot read /nonexistent/iampool/upstream"),
        "{e}"
    );
    assert!(e.fix.contains("or set IAMPOOL_UPSTREAM instead"), "{e}");

    // A typo in front of _FILE is still an unknown variable, with a suggestion.
    let typo = errors(
        &["--upstream", "postgres://u@h/d"],
        &[("IAMPOOL_UPSTRAEM_FILE", "x")],
    );
    assert_eq!(typo.len(), 1, "{typo:#?}");
    assert_eq!(typo[0].message, "unknown environment variable");
}

#[test]
fn read_only_database_names_another_transaction_mode_database() {
    let ok = file(
        "[databases.app]\nupstream = \"postgres://app@writer/app\"\nread_only_database = \"app_ro\"\n\
         [databases.app_ro]\nupstream = \"postgres://app@reader/app?target_session_attrs=read-only\"\n",
    );
    let config = Config::from_args(&["--config", path(&ok)], &[]).unwrap();
    let app = config.databases.iter().find(|d| d.name == "app").unwrap();
    assert_eq!(app.read_only_database.as_deref(), Some("app_ro"));

    for (toml, message, fix) in [
        (
            "[databases.app]\nupstream = \"postgres://app@h/app?read_only_database=nope\"\n",
            "names \"nope\", which is not a configured database",
            "add [databases.nope]",
        ),
        (
            "[databases.app]\nupstream = \"postgres://app@h/app\"\nread_only_database = \"app\"\n",
            "names this database itself",
            "reader endpoint",
        ),
        (
            "[databases.app]\nupstream = \"postgres://app@h/app\"\nread_only_database = \"ro\"\n\
             [databases.ro]\nupstream = \"postgres://app@r/app\"\npool_mode = \"session\"\n",
            "whose pool_mode is session",
            "[databases.ro]",
        ),
    ] {
        let toml = file(toml);
        let all = errors(&["--config", path(&toml)], &[]);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(all[0].key, "databases.app.read_only_database");
        assert!(all[0].message.contains(message), "{all:#?}");
        assert!(all[0].fix.contains(fix), "{all:#?}");
    }
}
