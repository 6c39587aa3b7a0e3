using NbdServer.Common.Posix;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Storage;

/// <summary>Turns an exception from file IO into the errno and typed result the protocol reports.</summary>
internal static class IoErrors
{
    public static int Errno(Exception e) => e switch
    {
        PosixIOException p => p.Errno,
        // .NET's Unix file IO raises IOException with HResult = the raw errno for errors it has no
        // special exception type for (ENOSPC, EIO, EDQUOT…).
        IOException io when io.HResult is > 0 and < 4096 => io.HResult,
        // EFBIG surfaces as ArgumentOutOfRangeException from RandomAccess.
        ArgumentOutOfRangeException => Errnos.EFBIG,
        UnauthorizedAccessException => Errnos.EPERM,
        _ => Errnos.EIO,
    };

    public static ResultCode Result(int errno) => errno switch
    {
        Errnos.ENOSPC or Errnos.EDQUOT or Errnos.EFBIG => ResultCode.NoSpace,
        _ => ResultCode.IoError,
    };

    public static bool IsIoFailure(Exception e) => e is IOException or UnauthorizedAccessException or ArgumentOutOfRangeException;
}
