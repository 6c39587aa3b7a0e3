using System.Diagnostics;
using System.Globalization;

namespace NbdServer.SystemTests;

/// <summary>
/// Locating and running the third-party NBD clients. A missing client is a failed test, never a
/// skipped one: scripts/test.sh installs them, and a skip would hide a broken install.
/// </summary>
internal static class RealClient
{
    /// <summary>Debian's python has the libnbd bindings; the pyenv <c>python3</c> on PATH does not.</summary>
    public const string SystemPath = "/usr/sbin:/usr/bin:/sbin:/bin";

    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(60);

    /// <summary>Fails the test unless <paramref name="path"/> is an installed executable.</summary>
    public static string Require(string path, string package)
    {
        if (!File.Exists(path))
        {
            Assert.Fail($"{path} is not installed: install the Debian package '{package}' (scripts/test.sh does it).");
        }
        return path;
    }

    /// <summary>Fails the test unless <c>import nbd</c> works in Debian's python (package python3-libnbd).</summary>
    public static async Task RequireNbdshAsync()
    {
        Require("/usr/bin/nbdsh", "python3-libnbd");
        ExternalTool.Result probe = await RunAsync("/usr/bin/python3", ["-c", "import nbd"], TimeSpan.FromSeconds(30));
        if (probe.ExitCode != 0)
        {
            Assert.Fail($"/usr/bin/python3 cannot import the libnbd bindings: install 'python3-libnbd'.\n{probe}");
        }
    }

    /// <summary>Runs a tool with PATH reduced to the system directories (so nbdsh finds Debian's python).</summary>
    public static Task<ExternalTool.Result> RunAsync(string tool, IEnumerable<string> args, TimeSpan? timeout = null, string? standardInput = null) =>
        ExternalTool.RunAsync("/usr/bin/env", [$"PATH={SystemPath}", tool, .. args], timeout ?? DefaultTimeout, standardInput);

    /// <summary>Runs a python script in nbdsh; the script connects the handle <c>h</c> itself.</summary>
    /// <summary>Runs qemu-io on a raw NBD export, one <c>-c</c> per command.</summary>
    public static async Task<ExternalTool.Result> QemuIoAsync(string uri, params string[] commands)
    {
        const string qemuIo = "/usr/bin/qemu-io";
        Require(qemuIo, "qemu-utils");
        var args = new List<string> { "-f", "raw", uri };
        foreach (string command in commands)
        {
            args.Add("-c");
            args.Add(command);
        }
        return await RunAsync(qemuIo, args, DefaultTimeout);
    }

    public static async Task<ExternalTool.Result> NbdshAsync(string script, TimeSpan? timeout = null)
    {
        await RequireNbdshAsync();
        return await RunAsync("/usr/bin/nbdsh", ["-c", script], timeout);
    }

    /// <summary>Starts a long-running client (nbdfuse, a connected nbdsh) in the background.</summary>
    public static Process Start(string tool, params string[] args)
    {
        var info = new ProcessStartInfo(tool)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        info.Environment["PATH"] = SystemPath;
        foreach (string arg in args)
        {
            info.ArgumentList.Add(arg);
        }
        Process process = Process.Start(info) ?? throw new InvalidOperationException($"could not start {tool}");
        // Drain the pipes so a chatty client can never block on a full pipe.
        process.OutputDataReceived += static (_, _) => { };
        process.ErrorDataReceived += static (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    /// <summary>Polls <paramref name="condition"/> until it holds or <paramref name="timeout"/> passes.</summary>
    public static async Task<bool> WaitUntilAsync(Func<bool> condition, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < timeout)
        {
            if (condition())
            {
                return true;
            }
            await Task.Delay(50);
        }
        return condition();
    }

    /// <summary>Writes <paramref name="bytes"/> of random data to a new file; returns its SHA-256 (hex).</summary>
    public static string WriteRandomFile(string path, long bytes, int seed)
    {
        var random = new Random(seed);
        byte[] chunk = new byte[1 << 20];
        using (var file = new FileStream(path, FileMode.CreateNew, FileAccess.Write))
        {
            for (long done = 0; done < bytes; done += chunk.Length)
            {
                random.NextBytes(chunk);
                file.Write(chunk, 0, (int)Math.Min(chunk.Length, bytes - done));
            }
        }
        return Sha256(path);
    }

    public static string Sha256(string path)
    {
        using FileStream file = File.OpenRead(path);
        return Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(file));
    }

    public static string Invariant(long value) => value.ToString(CultureInfo.InvariantCulture);
}

/// <summary>A fresh directory under the system temp directory, deleted on dispose.</summary>
internal sealed class ScratchDirectory : IDisposable
{
    public ScratchDirectory(string prefix)
    {
        Path = Directory.CreateTempSubdirectory($"nbd-systest-{prefix}-").FullName;
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
            // Something (a stuck FUSE mount) still holds it; the test already reported why.
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
