using System.Runtime.InteropServices;
using NbdServer.Common.Posix;

namespace NbdServer.Frontend.Server;

/// <summary>
/// SIGHUP, caught from the first line of the server: its default action ends the process, and a
/// reload's new image must survive an impatient second SIGHUP while it starts. The old image execs
/// the new one with SIGHUP blocked, so one that comes before this handler exists waits; installing
/// unblocks it. Until the service serves (<see cref="OnReload"/>) a reload is refused with one
/// line on stderr. Install on the main thread (see <see cref="ProcessImage.UnblockSignal"/>).
/// </summary>
internal static class ReloadSignal
{
    private static PosixSignalRegistration? s_registration;
    private static Action? s_handler;

    public static void Install()
    {
        s_registration ??= PosixSignalRegistration.Create(PosixSignal.SIGHUP, context =>
        {
            context.Cancel = true;
            if (Volatile.Read(ref s_handler) is { } handler)
            {
                handler();
            }
            else
            {
                Console.Error.WriteLine("nbd-server: reload (SIGHUP) refused: the server is still starting");
            }
        });
        ProcessImage.UnblockSignal(ProcessImage.SIGHUP);
    }

    /// <summary>What a SIGHUP does from now on (null: refuse it again).</summary>
    public static void OnReload(Action? handler) => Volatile.Write(ref s_handler, handler);
}

/// <summary>Checks, before a reload stops anything, that the new image could start: null if so, else why not.</summary>
internal sealed record ReloadPreflight(Func<string?> Check);
