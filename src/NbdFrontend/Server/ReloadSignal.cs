using System.Runtime.InteropServices;
using NbdServer.Common.Posix;

namespace NbdServer.Frontend.Server;

/// <summary>
/// SIGHUP, caught from the first line of the server: its default action ends the process, and a
/// reload's new image must survive an impatient second SIGHUP while it starts. The old image execs
/// the new one with SIGHUP blocked, so one that comes before this handler exists waits; installing
/// unblocks it. One that comes before the service serves is remembered and runs once it does
/// (<see cref="OnReload"/>); one that comes while it stops is refused. Install on the main thread
/// (see <see cref="ProcessImage.UnblockSignal"/>).
/// </summary>
internal static class ReloadSignal
{
    private static readonly Lock s_gate = new();
    private static PosixSignalRegistration? s_registration;
    private static Action? s_handler;
    private static bool s_pending;
    private static bool s_closed;

    public static void Install()
    {
        s_registration ??= PosixSignalRegistration.Create(PosixSignal.SIGHUP, context =>
        {
            context.Cancel = true;
            Action? handler;
            lock (s_gate)
            {
                handler = s_handler;
                if (handler is null && !s_closed)
                {
                    s_pending = true;
                }
            }
            if (handler is not null)
            {
                handler();
            }
            else
            {
                Console.Error.WriteLine(s_closed ? "nbd-server: reload (SIGHUP) refused: the server is stopping" : "nbd-server: reload (SIGHUP) deferred: it runs once the server serves");
            }
        });
        ProcessImage.UnblockSignal(ProcessImage.SIGHUP);
    }

    /// <summary>What a SIGHUP does from now on; a SIGHUP that came while starting runs it now.</summary>
    public static void OnReload(Action handler)
    {
        bool pending;
        lock (s_gate)
        {
            s_handler = handler;
            pending = s_pending;
            s_pending = false;
        }
        if (pending)
        {
            handler();
        }
    }

    /// <summary>The server is stopping: every SIGHUP from now on is refused.</summary>
    public static void Close()
    {
        lock (s_gate)
        {
            s_handler = null;
            s_pending = false;
            s_closed = true;
        }
    }
}

/// <summary>Checks, before a reload stops anything, that the new image could start: null if so, else why not.</summary>
internal sealed record ReloadPreflight(Func<string?> Check);
