using System.Collections;
using System.Net;
using NbdServer.Common.Cli;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// nbd-server's settings from a JSON file, NBD_SERVER_* variables and the command line: each source
/// alone, their precedence, unknown keys refused, and every validation error as one message naming
/// the setting, where it was set and the rule.
/// </summary>
public sealed class ConfigurationSourcesTests
{
    private const string Replicas = "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3";
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-config-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string Write(string json)
    {
        string path = Path.Combine(_dir, $"config-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        return path;
    }

    private static (ServeCommand Command, LayeredSettings Settings) Load(IDictionary environment, string? defaultConfigFile, params string[] args)
    {
        System.CommandLine.ParseResult result = FrontendCommandLine.Program.Root.Parse(args);
        Assert.That(result.Errors, Is.Empty);
        return ServeCommand.Load(result, environment, defaultConfigFile);
    }

    private static string Error(IDictionary environment, params string[] args) =>
        Assert.Throws<ArgumentException>(() => Load(environment, null, args))!.Message;

    [Test]
    public void A_json_file_sets_values_flags_and_lists()
    {
        string file = Write("""
            // comments and trailing commas are allowed
            {"downstairs": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], "max-outstanding-jobs": 100, "read-only": true, "export": "data",}
            """);
        (ServeCommand command, LayeredSettings settings) = Load(new Hashtable(), null, "--config", file);
        Assert.That(command.Engine!.Downstairs, Has.Count.EqualTo(3));
        Assert.That(command.Engine.MaxOutstandingJobs, Is.EqualTo(100));
        Assert.That((command.ReadOnly, command.ExportName), Is.EqualTo((true, "data")));
        Assert.That(settings.SourceOf(ServeSettings.MaxOutstandingJobs), Is.EqualTo($"in {file}"));
        Assert.That(settings.ConfigFile, Is.EqualTo(file));
    }

    [Test]
    public void Environment_variables_set_values_and_flags()
    {
        var environment = new Hashtable { ["NBD_SERVER_DOWNSTAIRS"] = Replicas, ["NBD_SERVER_MAX_OUTSTANDING_BYTES"] = "48MiB", ["NBD_SERVER_VERBOSE"] = "yes", ["OTHER"] = "x" };
        (ServeCommand command, LayeredSettings settings) = Load(environment, null);
        Assert.That(command.Engine!.MaxOutstandingBytes, Is.EqualTo(48 << 20));
        Assert.That(command.Verbose, Is.True);
        Assert.That(settings.SourceOf(ServeSettings.MaxOutstandingBytes), Is.EqualTo("by environment variable NBD_SERVER_MAX_OUTSTANDING_BYTES"));
    }

    [Test]
    public void The_command_line_alone_sets_everything_with_defaults_for_the_rest()
    {
        (ServeCommand command, LayeredSettings settings) = Load(new Hashtable(), null, "--memory", "64MiB", "--listen=127.0.0.1:0", "--read-only");
        Assert.That((command.Size, command.ReadOnly, command.Frontend.Listen), Is.EqualTo(((long?)(64 << 20), true, new IPEndPoint(IPAddress.Loopback, 0))));
        Assert.That(command.Frontend.MaxConnections, Is.EqualTo(new Server.FrontendOptions().MaxConnections));
        Assert.That(settings.SourceOf(ServeSettings.Memory), Is.EqualTo("on the command line"));
        Assert.That(settings.ConfigFile, Is.Null);
    }

    [Test]
    public void Command_line_overrides_environment_which_overrides_the_file()
    {
        string file = Write("""{"listen": "127.0.0.1:1", "unix": "/file.sock", "export": "file", "verbose": true, "read-only": true}""");
        var environment = new Hashtable { ["NBD_SERVER_LISTEN"] = "127.0.0.1:2", ["NBD_SERVER_UNIX"] = "/env.sock", ["NBD_SERVER_READ_ONLY"] = "false" };
        (ServeCommand command, LayeredSettings settings) = Load(environment, null, "--config", file, "--listen", "127.0.0.1:3");
        Assert.That(command.Frontend.Listen, Is.EqualTo(IPEndPoint.Parse("127.0.0.1:3")));
        Assert.That(command.Frontend.UnixSocketPath, Is.EqualTo("/env.sock"));
        Assert.That(command.ExportName, Is.EqualTo("file"));
        Assert.That(command.Verbose, Is.True, "on in the file, not mentioned elsewhere");
        Assert.That(command.ReadOnly, Is.False, "on in the file, turned off by the environment");
        Assert.That(settings.SourceOf(ServeSettings.Listen), Is.EqualTo("on the command line"));
    }

    [Test]
    public void A_repeated_option_keeps_its_last_value()
    {
        (ServeCommand command, _) = Load(new Hashtable(), null, "--export", "a", "--export", "b");
        Assert.That(command.ExportName, Is.EqualTo("b"));
    }

    [Test]
    public void The_config_file_comes_from_the_option_then_the_variable_then_the_default_when_it_exists()
    {
        string named = Write("""{"export": "named"}""");
        string fromVariable = Write("""{"export": "variable"}""");
        string fallback = Write("""{"export": "default"}""");
        var environment = new Hashtable { ["NBD_SERVER_CONFIG"] = fromVariable };
        Assert.That(Load(environment, fallback, "--config", named).Command.ExportName, Is.EqualTo("named"));
        Assert.That(Load(environment, fallback).Command.ExportName, Is.EqualTo("variable"));
        Assert.That(Load(new Hashtable(), fallback).Command.ExportName, Is.EqualTo("default"));
        Assert.That(Load(new Hashtable(), Path.Combine(_dir, "absent.json")).Settings.ConfigFile, Is.Null);
    }

    [Test]
    public void An_unknown_key_in_the_file_is_refused_naming_key_and_file()
    {
        string file = Write("""{"max-outstanding-job": 100}""");
        Assert.That(Error(new Hashtable(), "--config", file), Does.Contain("'max-outstanding-job'").And.Contain(file).And.Contain("no setting"));
    }

    [Test]
    public void A_nested_object_in_the_file_is_refused()
    {
        string file = Write("""{"frontend": {"listen": "127.0.0.1:1"}}""");
        Assert.That(Error(new Hashtable(), "--config", file), Does.Contain("'frontend'").And.Contain(file));
    }

    [Test]
    public void An_unknown_environment_variable_is_refused_naming_it()
    {
        Assert.That(Error(new Hashtable { ["NBD_SERVER_LISTN"] = "x" }), Does.Contain("NBD_SERVER_LISTN").And.Contain("no setting"));
    }

    [Test]
    public void A_file_that_is_not_json_is_refused_naming_it()
    {
        string file = Write("""{"listen": """);
        Assert.That(Error(new Hashtable(), "--config", file), Does.Contain(file).And.Contain("JSON"));
    }

    [Test]
    public void A_missing_config_file_is_refused_naming_it()
    {
        string file = Path.Combine(_dir, "missing.json");
        Assert.That(Error(new Hashtable(), "--config", file), Does.StartWith("--config: cannot read").And.Contain(file));
    }

    [Test]
    public void A_flag_that_is_not_true_or_false_is_refused_naming_its_source()
    {
        Assert.That(Error(new Hashtable { ["NBD_SERVER_READ_ONLY"] = "maybe" }),
            Is.EqualTo("--read-only: 'maybe' is not true or false (set by environment variable NBD_SERVER_READ_ONLY)."));
    }

    // Each rule once, set on the command line; the message names the option, the rule and the source.
    [TestCase("--max-outstanding-jobs must be 1..1000", "--downstairs", Replicas, "--max-outstanding-jobs", "5000")]
    [TestCase("--max-outstanding-bytes", "--downstairs", Replicas, "--max-outstanding-bytes", "1")]
    [TestCase("--listen: 'x' is not ADDRESS:PORT", "--listen", "x")]
    [TestCase("--tls: 'maybe' is not off, on or require", "--tls", "maybe")]
    [TestCase("--max-connections: '0' is not a positive integer", "--max-connections", "0")]
    [TestCase("--payload-timeout: '-1' is not a positive number of seconds", "--payload-timeout", "-1")]
    [TestCase("--scrub-interval: 'x' is not a number of seconds (0 or more)", "--downstairs", Replicas, "--scrub-interval", "x")]
    [TestCase("--repair-rate-limit: 'fast' is not a number (0 or more)", "--downstairs", Replicas, "--repair-rate-limit", "fast")]
    [TestCase("--repair-duty-cycle", "--downstairs", Replicas, "--repair-duty-cycle", "2")]
    [TestCase("--generation: 'x' is not a whole number", "--downstairs", Replicas, "--generation", "x")]
    [TestCase("--memory", "--memory", "lots")]
    [TestCase("--memory and --file are different backends", "--memory", "1MiB", "--file", "/tmp/x")]
    [TestCase("--downstairs and --file are different backends", "--downstairs", Replicas, "--file", "/tmp/x")]
    [TestCase("--export: the name must not be empty", "--export", "")]
    [TestCase("--downstairs: exactly three downstairs are needed (got 2)", "--downstairs", "127.0.0.1:1,127.0.0.1:2")]
    [TestCase("--metrics: 'x' is not ADDRESS:PORT", "--metrics", "x")]
    public void A_bad_value_is_one_message_naming_setting_rule_and_source(string expected, params string[] args)
    {
        string message = Error(new Hashtable(), args);
        Assert.That(message, Does.Contain(expected).And.EndWith("(set on the command line)"));
        Assert.That(message, Does.Not.Contain('\n'));
    }

    [Test]
    public void A_bad_value_from_the_file_or_the_environment_names_that_source()
    {
        string file = Write($$"""{"downstairs": "{{Replicas}}", "max-outstanding-jobs": 5000}""");
        Assert.That(Error(new Hashtable(), "--config", file), Does.Contain("--max-outstanding-jobs must be 1..1000").And.EndWith($"(set in {file})"));
        Assert.That(Error(new Hashtable { ["NBD_SERVER_DOWNSTAIRS"] = Replicas, ["NBD_SERVER_MAX_OUTSTANDING_JOBS"] = "5000" }),
            Does.Contain("--max-outstanding-jobs must be 1..1000").And.EndWith("(set by environment variable NBD_SERVER_MAX_OUTSTANDING_JOBS)"));
    }
}
