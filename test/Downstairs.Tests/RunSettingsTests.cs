using System.Collections;
using System.Net;
using NbdServer.Downstairs.Cli;
using NbdServer.Downstairs.Server;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// <c>nbd-downstairs run</c>'s settings from a JSON file, NBD_DOWNSTAIRS_* variables and the command
/// line, bound onto <see cref="DownstairsOptions"/>: precedence, unknown keys, errors with their source.
/// </summary>
public sealed class RunSettingsTests
{
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-run-config-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string Write(string json)
    {
        string path = Path.Combine(_dir, $"config-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        return path;
    }

    private static DownstairsOptions Load(IDictionary environment, params string[] args)
    {
        System.CommandLine.ParseResult result = DownstairsCommandLine.Program.Root.Parse(["run", .. args]);
        Assert.That(result.Errors, Is.Empty);
        return DownstairsCommandLine.Load(result, environment, defaultConfigFile: null).Options;
    }

    [Test]
    public void Command_line_overrides_environment_which_overrides_the_file()
    {
        string file = Write("""{"data": "/file", "io-threads": 3, "max-jobs": 100, "sticky-dirty": true, "listen": "127.0.0.1:1"}""");
        var environment = new Hashtable { ["NBD_DOWNSTAIRS_IO_THREADS"] = "4", ["NBD_DOWNSTAIRS_LISTEN"] = "127.0.0.1:2" };
        DownstairsOptions options = Load(environment, "--config", file, "--listen", "127.0.0.1:3", "--data", "/command-line");
        Assert.That((options.DataDir, options.IoThreads, options.MaxJobsPerConnection, options.StickyDirty), Is.EqualTo(("/command-line", 4, 100, true)));
        Assert.That(options.Listen, Is.EqualTo(IPEndPoint.Parse("127.0.0.1:3")));
    }

    [Test]
    public void Unknown_keys_and_variables_are_refused_naming_them()
    {
        string file = Write("""{"data": "/d", "io-thread": 3}""");
        Assert.That(() => Load(new Hashtable(), "--config", file), Throws.ArgumentException.With.Message.Contains("'io-thread'").And.Message.Contains(file));
        Assert.That(() => Load(new Hashtable { ["NBD_DOWNSTAIRS_DTA"] = "/d" }), Throws.ArgumentException.With.Message.Contains("NBD_DOWNSTAIRS_DTA"));
    }

    [Test]
    public void A_bad_value_names_the_setting_the_rule_and_where_it_was_set()
    {
        string file = Write("""{"data": "/d", "receive-buffer": "1K"}""");
        Assert.That(() => Load(new Hashtable(), "--config", file),
            Throws.ArgumentException.With.Message.EqualTo($"--receive-buffer must be 4 KiB to 16 MiB (set in {file})"));
        Assert.That(() => Load(new Hashtable(), "--data", "/d", "--hello-timeout", "soon"),
            Throws.ArgumentException.With.Message.EqualTo("--hello-timeout: 'soon' is not a number of seconds (set on the command line)"));
        Assert.That(() => Load(new Hashtable { ["NBD_DOWNSTAIRS_LISTEN"] = "0.0.0.0:3810" }, "--data", "/d"),
            Throws.ArgumentException.With.Message.StartsWith("--listen 0.0.0.0:3810 is not a loopback address").And.Message.EndsWith("(set by environment variable NBD_DOWNSTAIRS_LISTEN)"));
    }

    [Test]
    public void The_region_directory_is_required_from_some_source()
    {
        Assert.That(() => Load(new Hashtable()), Throws.ArgumentException.With.Message.StartsWith("--data is required"));
        Assert.That(Load(new Hashtable { ["NBD_DOWNSTAIRS_DATA"] = "/env" }).DataDir, Is.EqualTo("/env"));
    }
}
