using System.CommandLine;
using System.Text;

namespace NbdServer.Common.Cli;

/// <summary>
/// The man page (section 1, roff) of an executable, generated from the same command tree and
/// <see cref="CommandDoc"/>s as its help: the root command's sections, then each subcommand under
/// COMMANDS. No date in the header, so the committed page changes only when the text does.
/// </summary>
internal static class ManPage
{
    public static string Render(CliProgram program)
    {
        var roff = new StringBuilder();
        RootCommand root = program.Root;
        CommandDoc doc = program.DocOf(root);
        roff.Append(System.Globalization.CultureInfo.InvariantCulture, $".TH {program.Name.ToUpperInvariant()} 1 \"\" \"{program.Name}\" \"User Commands\"\n");
        roff.Append(".SH NAME\n").Append(Escape(program.Name)).Append(" \\- ").Append(Escape(root.Description ?? "")).Append('\n');
        roff.Append(".SH SYNOPSIS\n.nf\n");
        foreach (string line in doc.Synopsis.Count > 0 ? doc.Synopsis : [HelpText.DefaultSynopsis(program, root)])
        {
            roff.Append(Escape(line)).Append('\n');
        }
        roff.Append(".fi\n");
        if (doc.Description.Length > 0)
        {
            roff.Append(".SH DESCRIPTION\n");
            Paragraphs(roff, doc.Description);
        }
        foreach ((string title, IReadOnlyList<Option> options) in HelpText.Groups(root, doc))
        {
            roff.Append(".SH ").Append(Escape(title)).Append('\n');
            Options(roff, options);
        }
        List<Command> commands = [.. Walk(root).Where(c => c != root && !c.Hidden)];
        if (commands.Count > 0)
        {
            roff.Append(".SH COMMANDS\n");
            foreach (Command command in commands)
            {
                CommandDoc sub = program.DocOf(command);
                roff.Append(".SS \"").Append(Escape(program.PathOf(command))).Append("\"\n");
                roff.Append(Escape(command.Description ?? "")).Append('\n');
                roff.Append(".PP\n.nf\n");
                foreach (string line in sub.Synopsis.Count > 0 ? sub.Synopsis : [HelpText.DefaultSynopsis(program, command)])
                {
                    roff.Append(Escape(line)).Append('\n');
                }
                roff.Append(".fi\n");
                if (sub.Description.Length > 0)
                {
                    Paragraphs(roff, sub.Description);
                }
                foreach ((string title, IReadOnlyList<Option> options) in HelpText.Groups(command, sub))
                {
                    if (options.Any(o => o is not System.CommandLine.Help.HelpOption))
                    {
                        roff.Append(".PP\n\\fI").Append(Escape(title)).Append("\\fR\n");
                        Options(roff, options.Where(o => o is not System.CommandLine.Help.HelpOption));
                    }
                }
                foreach ((string title, string text) in sub.Sections)
                {
                    roff.Append(".PP\n\\fI").Append(Escape(title)).Append("\\fR\n");
                    Paragraphs(roff, text);
                }
            }
        }
        foreach ((string title, string text) in doc.Sections)
        {
            roff.Append(".SH ").Append(Escape(title)).Append('\n');
            Paragraphs(roff, text);
        }
        return roff.ToString();
    }

    private static IEnumerable<Command> Walk(Command command)
    {
        yield return command;
        foreach (Command sub in command.Subcommands)
        {
            foreach (Command c in Walk(sub))
            {
                yield return c;
            }
        }
    }

    private static void Options(StringBuilder roff, IEnumerable<Option> options)
    {
        foreach (Option option in options)
        {
            string label = HelpText.Label(option);
            int space = label.LastIndexOf(' ');
            roff.Append(".TP\n");
            if (!option.IsFlag() && option is not System.CommandLine.Help.HelpOption && space > 0)
            {
                roff.Append("\\fB").Append(Escape(label[..space])).Append("\\fR \\fI").Append(Escape(label[(space + 1)..])).Append("\\fR\n");
            }
            else
            {
                roff.Append("\\fB").Append(Escape(label)).Append("\\fR\n");
            }
            roff.Append(Escape(option.Description ?? "")).Append('\n');
        }
    }

    /// <summary>Blank-line separated paragraphs; a paragraph with indented lines (examples) is kept as it is.</summary>
    private static void Paragraphs(StringBuilder roff, string text)
    {
        foreach (string block in text.Trim().Split("\n\n"))
        {
            string[] lines = block.Split('\n');
            if (lines.Skip(1).Any(l => l.StartsWith(' ')))
            {
                roff.Append(".PP\n.nf\n");
                foreach (string line in lines)
                {
                    roff.Append(Escape(line.TrimEnd())).Append('\n');
                }
                roff.Append(".fi\n");
            }
            else
            {
                roff.Append(".PP\n").Append(Escape(string.Join(' ', lines.Select(l => l.Trim())))).Append('\n');
            }
        }
    }

    internal static string Escape(string text)
    {
        string escaped = text.Replace("\\", "\\e", StringComparison.Ordinal).Replace("-", "\\-", StringComparison.Ordinal);
        return escaped.StartsWith('.') || escaped.StartsWith('\'') ? "\\&" + escaped : escaped;
    }
}
