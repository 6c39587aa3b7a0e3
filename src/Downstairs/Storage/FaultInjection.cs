using NbdServer.Common.Posix;

namespace NbdServer.Downstairs.Storage;

/// <summary>
/// Test-only switch (DESIGN §6 incident suite): while a trigger file exists, writes or flushes fail
/// with the errno named in it (EIO when empty or unreadable). A file, not a signal, so a test can
/// flip it under a live process and the downstairs needs no extra endpoint.
/// </summary>
internal sealed class FaultInjection(string? failWritesWhen, string? failFlushesWhen)
{
    public bool Enabled => failWritesWhen is not null || failFlushesWhen is not null;

    public void BeforeWrite(string path) => Check(failWritesWhen, "pwrite (injected)", path);

    public void BeforeFlush(string path) => Check(failFlushesWhen, "fdatasync (injected)", path);

    private static void Check(string? trigger, string operation, string path)
    {
        if (trigger is null || !File.Exists(trigger))
        {
            return;
        }
        string name;
        try
        {
            name = File.ReadAllText(trigger).Trim().ToUpperInvariant();
        }
        catch (IOException)
        {
            name = "";
        }
        int errno = name switch
        {
            "ENOSPC" => Errnos.ENOSPC,
            "EDQUOT" => Errnos.EDQUOT,
            _ => Errnos.EIO,
        };
        throw new PosixIOException(errno, operation, path);
    }
}
