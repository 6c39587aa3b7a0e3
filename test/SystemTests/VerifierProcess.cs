using System.Globalization;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// A real <c>nbd-verify</c> (src/Tools/Verify) against the volume, with its write log in a file: a
/// load in the background (stopped by SIGTERM, after which it flushes and reads its whole range back
/// against the log), or a one-shot <c>--check-only</c> run. Disposing kills it.
/// </summary>
internal sealed partial class VerifierProcess : IDisposable
{
    /// <summary>Bound on the verifier's end: the drain of its requests, the final flush and the read-back.</summary>
    public static readonly TimeSpan FinishTimeout = TimeSpan.FromSeconds(60);

    private readonly LoggedProcess _process;

    private VerifierProcess(LoggedProcess process) => _process = process;

    public bool HasExited => _process.HasExited;

    public string Log => _process.Log;

    /// <summary>
    /// Starts a load (<paramref name="args"/> are nbd-verify options besides --uri and --log) and
    /// waits until its first per-second line says IO is flowing.
    /// </summary>
    public static async Task<VerifierProcess> StartAsync(string uri, string logPath, params string[] args)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "nbd-verify.dll");
        var verifier = new VerifierProcess(LoggedProcess.Start("dotnet", [dll, "--uri", uri, "--log", logPath, .. args]));
        try
        {
            await verifier._process.WaitForAsync(@"verify: t=\d+ .*ios=[1-9]", TimeSpan.FromSeconds(30));
            return verifier;
        }
        catch
        {
            verifier.Dispose();
            throw;
        }
    }

    /// <summary>The volume checked against the log in <paramref name="logPath"/> (only flushed writes are promised).</summary>
    public static async Task<VerifierResult> CheckOnlyAsync(string uri, string logPath, CancellationToken cancellationToken)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "nbd-verify.dll");
        using var verifier = new VerifierProcess(LoggedProcess.Start("dotnet", [dll, "--uri", uri, "--log", logPath, "--check-only"]));
        return await verifier.WaitAsync(cancellationToken);
    }

    /// <summary>SIGTERM: the load ends, the verifier flushes and reads everything back.</summary>
    public async Task<VerifierResult> StopAsync()
    {
        int code = await _process.TerminateAsync(FinishTimeout);
        return VerifierResult.Parse(code, _process.Log);
    }

    /// <summary>Waits for the verifier to end on its own (its duration over, or its connection lost).</summary>
    public async Task<VerifierResult> WaitAsync(CancellationToken cancellationToken)
    {
        int code = await _process.WaitForExitAsync(FinishTimeout, cancellationToken);
        return VerifierResult.Parse(code, _process.Log);
    }

    public void Dispose() => _process.Dispose();
}

/// <summary>An nbd-verify run's exit code and the key=value figures of its summary line.</summary>
internal sealed partial record VerifierResult(int ExitCode, IReadOnlyDictionary<string, string> Summary, string Output)
{
    /// <summary>Exit codes of nbd-verify (see its --help).</summary>
    public const int ExitOk = 0;
    public const int ExitConnectionLost = 3;

    public long this[string key] => Summary.TryGetValue(key, out string? v)
        ? long.Parse(v, NumberStyles.Integer, CultureInfo.InvariantCulture)
        : throw new KeyNotFoundException($"no {key} in the verifier's summary:\n{Output}");

    public string Text(string key) => Summary.TryGetValue(key, out string? v) ? v : throw new KeyNotFoundException($"no {key} in the verifier's summary:\n{Output}");

    public static VerifierResult Parse(int exitCode, string output)
    {
        string? line = output.Split('\n').LastOrDefault(l => l.StartsWith("verify: summary ", StringComparison.Ordinal));
        Dictionary<string, string> summary = line is null
            ? []
            : KeyValue().Matches(line).ToDictionary(m => m.Groups[1].Value, m => m.Groups[2].Value);
        return new VerifierResult(exitCode, summary, output);
    }

    public override string ToString() => $"nbd-verify exit {ExitCode}\n{Output}";

    [GeneratedRegex(@"(\w+)=(\S+)")]
    private static partial Regex KeyValue();
}
