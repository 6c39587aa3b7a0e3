using System.Collections;
using System.Globalization;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Win32.SafeHandles;
using NbdServer.Common.Posix;

namespace NbdServer.Frontend.Server;

/// <summary>
/// Reload without dropping a client: the running image stops every connection between two
/// requests, writes a <see cref="HandoverState"/> into a memory file and execs the same command
/// line (a new binary, after an upgrade); the new image opens the volume again and resumes the
/// connections where they stopped. The clients see a pause, never an error or a reconnect, so a
/// kernel client keeps /dev/nbd0 and its filesystem through an upgrade of nbd-server.
/// </summary>
internal static class Handover
{
    /// <summary>The memory file's descriptor number, for the next image (not an NBD_SERVER_ setting).</summary>
    public const string EnvironmentVariable = "NBD_HANDOVER_FD";

    /// <summary>
    /// The state the previous image left, or null on a fresh start. The variable is removed at once
    /// so nothing this process starts inherits it.
    /// </summary>
    public static HandoverState? Take(ILogger logger)
    {
        HandoverState? state = Read(logger, out bool handed);
        if (state is null && handed)
        {
            int closed = ProcessImage.CloseInheritedSockets();
            FrontendLog.HandedNotUsed(logger, $"{closed} inherited socket(s)", "closed: their clients must reconnect");
        }
        return state;
    }

    private static HandoverState? Read(ILogger logger, out bool handed)
    {
        handed = false;
        string? text = Environment.GetEnvironmentVariable(EnvironmentVariable);
        if (text is null)
        {
            return null;
        }
        Environment.SetEnvironmentVariable(EnvironmentVariable, null);
        handed = true;
        if (!int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int fd) || fd < 3)
        {
            FrontendLog.HandoverUnreadable(logger, $"{EnvironmentVariable}='{text}' is not a descriptor number");
            return null;
        }
        try
        {
            using var file = new SafeFileHandle(fd, ownsHandle: true);
            long length = RandomAccess.GetLength(file);
            long limit = HandoverState.MaxDocumentBytes;
            if (length > limit)
            {
                FrontendLog.HandoverUnreadable(logger, $"{length} bytes, above the {limit}-byte limit");
                return null;
            }
            byte[] bytes = new byte[length];
            int read = RandomAccess.Read(file, bytes, 0);
            if (!HandoverState.TryRead(bytes.AsSpan(0, read), out HandoverState? state, out string error))
            {
                FrontendLog.HandoverUnreadable(logger, error);
                return null;
            }
            return state;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or OutOfMemoryException)
        {
            FrontendLog.HandoverUnreadable(logger, e.Message);
            return null;
        }
    }

    /// <summary>
    /// Set (to 1) for the trial start of <see cref="TestStartAsync"/>: the image loads and checks its
    /// settings as a reload's new image would, then exits 0 without binding or opening anything.
    /// </summary>
    public const string CheckVariable = "NBD_RELOAD_CHECK";

    /// <summary>Longest line of the trial's error output quoted in a refusal.</summary>
    private const int MaxQuotedChars = 400;

    /// <summary>
    /// Starts the executable and command line a reload would exec, as they are on disk now, with
    /// <see cref="CheckVariable"/> set, while the clients are still served. Null when it exited 0
    /// within <paramref name="timeout"/>, else why not. A broken upgrade (a runtime or assembly that
    /// no longer loads, a setting the new code refuses) is then a refused reload, not clients left
    /// with nothing: once they are stopped, a failed exec can only end the process.
    /// </summary>
    public static async Task<string?> TestStartAsync(TimeSpan timeout)
    {
        string[] argv = ProcessImage.CommandLine();
        var start = new System.Diagnostics.ProcessStartInfo(Environment.ProcessPath!)
        {
            UseShellExecute = false,
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        foreach (string argument in argv.Skip(1))
        {
            start.ArgumentList.Add(argument);
        }
        start.Environment[CheckVariable] = "1";
        start.Environment.Remove(EnvironmentVariable);
        start.Environment.Remove("NOTIFY_SOCKET"); // the trial must not speak to systemd for the service
        using var trial = new System.Diagnostics.Process { StartInfo = start };
        try
        {
            trial.Start();
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException)
        {
            return $"the new image could not be started: {e.Message}";
        }
        trial.StandardInput.Close();
        Task<string> output = trial.StandardOutput.ReadToEndAsync();
        Task<string> errors = trial.StandardError.ReadToEndAsync();
        using var deadline = new CancellationTokenSource(timeout);
        try
        {
            await trial.WaitForExitAsync(deadline.Token);
        }
        catch (OperationCanceledException)
        {
            trial.Kill(entireProcessTree: true);
            return $"the new image did not finish its trial start within {timeout.TotalSeconds:0} s";
        }
        if (trial.ExitCode == 0)
        {
            return null;
        }
        string said = (await errors).Trim() is { Length: > 0 } e2 ? e2 : (await output).Trim();
        // The first line: our own errors are one line, and a runtime's crash names its exception there.
        string first = said.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).FirstOrDefault() ?? "no output";
        return $"the new image's trial start failed (exit code {trial.ExitCode}): {(first.Length > MaxQuotedChars ? first[..MaxQuotedChars] + "…" : first)}";
    }

    /// <summary>Null when this process can exec itself again, else why not (checked before anything is stopped).</summary>
    public static string? CannotReload() =>
        Environment.ProcessPath is not { } path ? "the process's executable is unknown" : ProcessImage.CannotExecute(path);

    /// <summary>
    /// Replaces this process with a new image of the same command line, handing it
    /// <paramref name="state"/> and the descriptors it names. Returns only when exec failed, with why.
    /// </summary>
    /// <param name="sockets">The sockets behind the descriptors: referenced until exec so none is closed by a finalizer.</param>
    public static string Exec(HandoverState state, IReadOnlyList<Socket> sockets)
    {
        SafeFileHandle file = ProcessImage.CreateMemoryFile("nbd-server-handover");
        RandomAccess.Write(file, state.ToBytes(), 0);
        int fd = (int)file.DangerousGetHandle();
        ProcessImage.KeepAcrossExec(fd);
        foreach (HandedListener l in state.Listeners)
        {
            ProcessImage.KeepAcrossExec(l.Fd);
        }
        foreach (HandedSession s in state.Sessions)
        {
            ProcessImage.KeepAcrossExec(s.Fd);
        }
        var environment = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (DictionaryEntry e in Environment.GetEnvironmentVariables())
        {
            environment[(string)e.Key] = (string?)e.Value ?? "";
        }
        environment[EnvironmentVariable] = fd.ToString(CultureInfo.InvariantCulture);
        string failure = ProcessImage.Exec(Environment.ProcessPath!, ProcessImage.CommandLine(), environment, ProcessImage.SIGHUP);
        GC.KeepAlive(sockets);
        GC.KeepAlive(file);
        return failure;
    }
}
