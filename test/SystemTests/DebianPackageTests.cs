using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// The Debian package (scripts/package-deb.sh): it builds from the published binaries, lintian
/// finds no error or warning the script does not accept, it holds what an operator expects where
/// Debian puts it, and scripts/check-deb.sh installs it into a clean Debian 12 chroot, runs it,
/// verifies its units and removes and purges it without leftovers. Needs root, dpkg-dev, lintian
/// and mmdebstrap (scripts/test.sh installs them); skip with <c>--filter Category!=Package</c>.
/// </summary>
[TestFixture]
[Category("Package")]
[NonParallelizable]
public sealed partial class DebianPackageTests
{
    private const string PackageName = "nbd-server-replicated";

    private static readonly string[] Executables = ["nbd-server", "nbd-downstairs", "nbd-certs", "nbd-verify"];

    private string _output = null!;
    private string _deb = null!;
    private string _log = "";

    [OneTimeSetUp]
    public async Task BuildPackage()
    {
        _output = Directory.CreateTempSubdirectory("nbd-deb-").FullName;
        string published = await PublishAsync();
        // gzip at level 1: the archive's xz takes minutes for ~85 MB of runtime on 2 CPUs.
        ExternalTool.Result build = await ExternalTool.RunAsync(Path.Combine(Repository.Root, "scripts/package-deb.sh"),
            ["--from", published, "--output", _output, "--compress", "gzip", "--compress-level", "1"], TimeSpan.FromMinutes(5));
        Assert.That(build.ExitCode, Is.Zero, build.ToString());
        _log = build.Error;
        _deb = build.Output.Trim().Split('\n')[^1];
        Assert.That(File.Exists(_deb), Is.True, build.ToString());
    }

    [OneTimeTearDown]
    public void RemoveOutput()
    {
        try
        {
            Directory.Delete(_output, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    [Test]
    [CancelAfter(300_000)]
    public async Task Lintian_finds_no_error_and_no_warning_the_script_does_not_accept()
    {
        ExternalTool.Result lintian = await ExternalTool.RunAsync("lintian", ["--fail-on", "error,warning", "--display-level", ">=warning", _deb], TimeSpan.FromMinutes(4));

        Assert.That(lintian.ExitCode, Is.Zero, lintian.ToString());
        Assert.That(LintianTag().Matches(lintian.Output).Select(m => m.Value), Is.Empty, lintian.ToString());
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task The_package_holds_the_executables_units_conffiles_and_a_root_only_tls_directory()
    {
        ExternalTool.Result contents = await ExternalTool.RunAsync("dpkg-deb", ["--contents", _deb], TimeSpan.FromMinutes(1));
        Assert.That(contents.ExitCode, Is.Zero, contents.ToString());
        var entries = contents.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .ToDictionary(f => string.Join(' ', f[5..]).TrimStart('.'), f => (Mode: f[0], Owner: f[1]));

        Assert.That(entries.Values.Select(e => e.Owner).Distinct(), Is.EqualTo(new[] { "root/root" }));
        foreach (string exe in Executables)
        {
            Assert.That(entries, Does.ContainKey($"/usr/bin/{exe} -> ../lib/{PackageName}/{exe}"));
            Assert.That(entries, Does.ContainKey($"/usr/lib/{PackageName}/{exe}").WithValue(("-rwxr-xr-x", "root/root")));
        }
        Assert.That(entries, Does.ContainKey($"/usr/lib/{PackageName}/libcoreclr.so").WithValue(("-rw-r--r--", "root/root")), "one runtime, shared");
        Assert.That(entries, Does.ContainKey("/lib/systemd/system/nbd-server.service"));
        Assert.That(entries, Does.ContainKey("/lib/systemd/system/nbd-downstairs@.service"));
        Assert.That(entries, Does.ContainKey("/etc/nbd-server/tls/").WithValue(("drwx------", "root/root")));
        Assert.That(entries, Does.ContainKey($"/usr/share/doc/{PackageName}/copyright"));
        Assert.That(entries, Does.ContainKey($"/usr/share/doc/{PackageName}/examples/nbd@nbd0.service.d/nbd-server.conf"));
        Assert.That(entries.Keys.Where(k => k.StartsWith("/var/", StringComparison.Ordinal)), Is.Empty, "state directories are made by postinst, owned by nbd");

        ExternalTool.Result conffiles = await ExternalTool.RunAsync("dpkg-deb", ["--info", _deb, "conffiles"], TimeSpan.FromMinutes(1));
        Assert.That(conffiles.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries),
            Is.EquivalentTo(new[] { "/etc/nbd-server/nbd-server.json", "/etc/nbd-server/nbd-downstairs.json", "/etc/nbd-server/nbd-server.env" }));
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task The_units_start_the_packaged_executables_from_usr_bin()
    {
        string extracted = Path.Combine(_output, "extracted");
        ExternalTool.Result x = await ExternalTool.RunAsync("dpkg-deb", ["--extract", _deb, extracted], TimeSpan.FromMinutes(1));
        Assert.That(x.ExitCode, Is.Zero, x.ToString());

        foreach (string unit in new[] { "nbd-server.service", "nbd-downstairs@.service" })
        {
            string text = await File.ReadAllTextAsync(Path.Combine(extracted, "lib/systemd/system", unit));
            Assert.That(text, Does.Not.Contain("/usr/local"), unit);
            Assert.That(ExecStart().Match(text).Groups[1].Value, Does.StartWith("/usr/bin/nbd-"), unit);
            Assert.That(text, Does.Contain($"Documentation=").And.Contain($"file:/usr/share/doc/{PackageName}/README.md.gz"), unit);
        }
        Assert.That(File.Exists(Path.Combine(extracted, $"usr/share/doc/{PackageName}/README.md.gz")), Is.True);
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task Man_pages_and_completions_are_packaged_exactly_when_the_repository_and_executables_provide_them()
    {
        ExternalTool.Result contents = await ExternalTool.RunAsync("dpkg-deb", ["--contents", _deb], TimeSpan.FromMinutes(1));
        string listing = contents.Output;

        string manDir = Path.Combine(Repository.Root, "docs/man");
        var expectedPages = Directory.Exists(manDir)
            ? Directory.EnumerateFiles(manDir).Select(Path.GetFileName).Where(n => ManPage().IsMatch(n!)).Select(n => $"{n}.gz").ToHashSet()
            : [];
        var packagedPages = PackagedManPage().Matches(listing).Select(m => m.Groups[1].Value).ToHashSet();
        Assert.That(packagedPages, Is.EquivalentTo(expectedPages));

        foreach (string exe in Executables)
        {
            bool packaged = listing.Contains($"/usr/share/bash-completion/completions/{exe}\n", StringComparison.Ordinal);
            bool skipped = _log.Contains($"'{exe} completion bash' gave no completion script", StringComparison.Ordinal);
            Assert.That(packaged, Is.Not.EqualTo(skipped), $"{exe}: a completion script, or a warning that there is none\n{_log}");
        }
    }

    [Test]
    [CancelAfter(300_000)]
    public async Task The_package_installs_runs_and_purges_cleanly_in_a_Debian_12_chroot()
    {
        ExternalTool.Result check = await ExternalTool.RunAsync(Path.Combine(Repository.Root, "scripts/check-deb.sh"), [_deb], TimeSpan.FromMinutes(4));

        Assert.That(check.ExitCode, Is.Zero, check.ToString());
        string last = check.Output.Trim().Split('\n')[^1];
        Assert.That(last, Does.StartWith("check-deb.sh: PASS"), check.ToString());
        if (!last.Contains("PASS (chroot)", StringComparison.Ordinal))
        {
            Assert.Warn($"the chroot check fell back to a weaker one: {last}");
        }
    }

    /// <summary>
    /// The package's layout, published by package-deb.sh without ReadyToRun (its compile takes
    /// minutes on a small machine) into artifacts/publish-test-deb, reused while no source file is
    /// newer than the executables.
    /// </summary>
    private static async Task<string> PublishAsync()
    {
        string output = Path.Combine(Repository.Root, "artifacts/publish-test-deb/linux-x64");
        string[] executables = Executables.Select(e => Path.Combine(output, e)).ToArray();
        DateTime newestSource = Directory.EnumerateFiles(Path.Combine(Repository.Root, "src"), "*", SearchOption.AllDirectories)
            .Where(f => !f.Contains("/bin/", StringComparison.Ordinal) && !f.Contains("/obj/", StringComparison.Ordinal))
            .Append(Path.Combine(Repository.Root, "Directory.Packages.props"))
            .Append(Path.Combine(Repository.Root, "Directory.Build.props"))
            .Max(File.GetLastWriteTimeUtc);
        if (executables.All(File.Exists) && executables.Min(File.GetLastWriteTimeUtc) > newestSource)
        {
            return output;
        }
        ExternalTool.Result publish = await ExternalTool.RunAsync(Path.Combine(Repository.Root, "scripts/package-deb.sh"),
            ["--publish-only", "--publish-dir", output, "--no-r2r"], TimeSpan.FromMinutes(9));
        Assert.That(publish.ExitCode, Is.Zero, publish.ToString());
        foreach (string e in executables)
        {
            File.SetLastWriteTimeUtc(e, DateTime.UtcNow);
        }
        return output;
    }

    [GeneratedRegex(@"(?m)^[EW]: .*$")]
    private static partial Regex LintianTag();

    [GeneratedRegex(@"(?m)^ExecStart=(\S+)")]
    private static partial Regex ExecStart();

    [GeneratedRegex(@"^[\w.-]+\.[1-8]$")]
    private static partial Regex ManPage();

    [GeneratedRegex(@"/usr/share/man/man[1-8]/([\w.-]+\.[1-8]\.gz)")]
    private static partial Regex PackagedManPage();
}
